"""Run manifests and progress logging shared by every stage.

A manifest (``runs/<stage>/<run_id>.json`` under the storage root) records what a run read
(with versions), what it wrote, the config fingerprint, the code version, row and quarantine
counts and timings. It never contains secrets: configs go in through
:meth:`deepcontent.config.Config.public_dict`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from deepcontent import __version__
from deepcontent.console import setup_logging  # noqa: F401 - re-exported: the console's set-up
from deepcontent.redact import redact, redact_text  # noqa: F401 - redact_text re-exported

log = logging.getLogger("deepcontent")


def code_version() -> str:
    """Package version plus the git commit when running from a checkout (``0.1.0+abc1234``)."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        try:
            sha = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5,
            ).stdout.strip()
            return f"{__version__}+{sha}{'.dirty' if dirty else ''}"
        except (OSError, subprocess.SubprocessError):
            pass
    return __version__


@dataclass
class RunManifest:
    stage: str
    run_id: str
    config: dict[str, Any]
    config_hash: str
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    status: str = "running"
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    finished_at: str | None = None
    code_version: str = field(default_factory=code_version)
    host: str = field(default_factory=lambda: os.uname().nodename)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[what] = round(self.timings_s.get(what, 0.0) + time.perf_counter() - t0, 3)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def write(self, storage, *, status: str) -> str:
        """Write the manifest to ``runs/<stage>/<run_id>.json``; returns its URI."""
        self.status = status
        self.finished_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        uri = storage.uri("runs", self.stage, f"{self.run_id}.json")
        storage.write_json(uri, redact(self.to_dict()))
        return uri


class Progress:
    """Progress of a long loop: a bar (tqdm) when stderr is a terminal and the CLI shows INFO
    lines as text (:func:`deepcontent.console.progress_bars_enabled`), else rate-limited lines
    ``stage: what 120/300 (40%), 12.3/s, eta 15s``. Either way the last step logs its line."""

    def __init__(self, stage: str, what: str, total: int | None, *, every_s: float = 5.0) -> None:
        self.stage, self.what, self.total, self.every_s = stage, what, total, every_s
        self.done = 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        from deepcontent import console

        if console.progress_bars_enabled():
            from tqdm import tqdm

            class _Bar(tqdm):
                monitor_interval = 0  # no monitor thread (stages fork worker processes)

            try:  # a terminal that reports no size (0 x 0: some pseudo-terminals) gets 80 columns
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except (OSError, ValueError, AttributeError):
                width = 0
            size = {"dynamic_ncols": True} if width > 0 else {"ncols": 80, "nrows": 24}
            self._bar = _Bar(total=total, desc=f"{stage}: {what}", file=sys.stderr, leave=False, mininterval=0.2, **size)
            console.bar_opened()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if self._bar is not None:
            self._bar.update(n)
            if finished:
                self.close()
                self._emit(now)
            return
        if now - self._last >= self.every_s or finished:
            self._last = now
            self._emit(now)

    def close(self) -> None:
        """Take the bar off the terminal (done by the last :meth:`update` when the total is known)."""
        if self._bar is not None:
            from deepcontent import console

            self._bar.close()
            self._bar = None
            console.bar_closed()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("%s: %s %d/%d (%d%%), %.1f/s, eta %.0fs", self.stage, self.what, self.done,
                     self.total, 100 * self.done // self.total, rate, eta)
        else:
            log.info("%s: %s %d, %.1f/s", self.stage, self.what, self.done, rate)
