"""Crash points: where the reliability tests kill a run, and nothing else.

A stage calls :func:`crash_point` with a name (``"ingest:after_commit:tracks"``) at each publish
and commit. In production it is a dictionary lookup that does nothing. When the environment
variable ``DEEPCONTENT_CRASH_AT`` holds that name, the process kills itself with SIGKILL on the
spot (no cleanup, no ``finally``: what a lost node or an OOM kill does), so a test can check that
the re-run repairs every such window. ``DEEPCONTENT_CRASH_LOG`` names a file to which every
point passed is appended, so a test can list the points a clean run goes through.
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "DEEPCONTENT_CRASH_AT"
LOG_ENV = "DEEPCONTENT_CRASH_LOG"


def crash_point(name: str) -> None:
    """Die here (SIGKILL) when ``DEEPCONTENT_CRASH_AT`` equals ``name``."""
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
