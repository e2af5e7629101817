"""Run an untrusted decoder in a child process so that a hang or a crash costs one clip, not a job.

Audio decoders are native code fed with files from the outside world. A file that makes one
loop forever, exhaust memory or segfault would otherwise kill the Spark Python worker, fail the
task four times and take the job down with it. :class:`IsolatedWorker` keeps one forked child
per task, sends it one clip at a time over a pipe and waits with a deadline:

* the function raised :class:`~deepcontent.audio.features.AudioError` -> its ``reason``;
* the child did not answer in time -> ``timeout`` (the child is killed and replaced);
* the child died (signal, ``os.abort``, out of memory under its address-space limit) -> ``crashed``;
* any other exception -> ``undecodable`` with the exception text.

The IPC cost is one pickle of the input bytes and one of the result per clip (~1 ms for a 30 s
clip), small next to decoding it.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import traceback
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Failure:
    reason: str
    detail: str


def resolve(path: str) -> Callable:
    """``"package.module:function"`` -> the function."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


def _child(conn, fn_path: str, memory_limit_mb: int | None) -> None:
    # The child must not take its parent's signals (Spark's worker handles SIGTERM itself).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fn = resolve(fn_path)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        args, kwargs = msg
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except MemoryError:
            conn.send(("err", "crashed", "out of memory while decoding"))
        except Exception as exc:  # reported, never raised across the pipe
            reason = getattr(exc, "reason", None)
            if reason:
                conn.send(("err", str(reason), str(exc)))
            else:
                conn.send(("err", "undecodable", f"{type(exc).__name__}: {exc}"[:500]))


class IsolatedWorker:
    """One child process running ``fn_path`` on request, replaced after a timeout or crash.

    >>> with IsolatedWorker("deepcontent.audio.features:compute_log_mel", timeout_s=60) as w:
    ...     result = w.call(data, settings=settings)   # the result, or a Failure
    """

    def __init__(self, fn_path: str, *, timeout_s: float, memory_limit_mb: int | None = None) -> None:
        resolve(fn_path)  # fail fast, in the parent, on a bad path
        self.fn_path = fn_path
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self._ctx = mp.get_context("fork")
        self._proc = None
        self._conn = None
        self.restarts = 0

    def _start(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        self._proc = self._ctx.Process(target=_child, args=(child, self.fn_path, self.memory_limit_mb), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """The function's result, or a :class:`Failure` (never raises for a bad input)."""
        if self._proc is None or not self._proc.is_alive():
            if self._proc is not None:
                self.restarts += 1
                self._kill()
            self._start()
        try:
            self._conn.send((args, kwargs))
            if not self._conn.poll(self.timeout_s):
                self._kill()
                self.restarts += 1
                return Failure("timeout", f"no result within {self.timeout_s:g}s; decoder killed")
            msg = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            code = self._proc.exitcode if self._proc is not None else None
            if self._proc is not None:
                self._proc.join(timeout=5)
                code = self._proc.exitcode
            self._kill()
            self.restarts += 1
            how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            return Failure("crashed", f"decoder process died ({how})")
        if msg[0] == "ok":
            return msg[1]
        return Failure(msg[1], msg[2])

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=2)
            except (BrokenPipeError, OSError):
                pass
        self._kill()

    def __enter__(self) -> "IsolatedWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
