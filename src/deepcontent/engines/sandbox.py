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

:class:`ClipDecoder` is what the stages use: it fetches clips from object storage (the next one
while the child decodes this one), turns a missing, unreadable or oversized object into a
:class:`Failure` without reading it, and warms the decoder up in the parent before the child is
forked. The spectrogram job, the waveform job and the evaluation's target sets all decode
through it.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import signal
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

if TYPE_CHECKING:
    from deepcontent.storage import Storage


# Failures that say nothing about the audio itself (a slow or overloaded node, a dead decoder
# process, a store that did not answer): a later run tries the clip again, up to a budget.
# Every other reason (undecodable, empty, silent, too_long...) is a property of the file.
TRANSIENT_REASONS: frozenset[str] = frozenset({"timeout", "crashed", "unreadable"})


@dataclass(frozen=True)
class Failure:
    reason: str
    detail: str


def resolve(path: str) -> Callable:
    """``"package.module:function"`` -> the function (allow-listed: :mod:`deepcontent.hooks`)."""
    from deepcontent.hooks import resolve_hook

    return resolve_hook(path, field="spectrograms.compute_fn")


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


_WARM: set[str] = set()


def warm_up(fn_path: str, settings) -> None:
    """Run ``fn_path`` once in this (long-lived, reused) worker on a short generated clip, so
    lazy imports and cached filterbanks are loaded *before* the isolated child is forked and
    every child starts warm (otherwise each task pays ~3 s of first-call set-up)."""
    if fn_path in _WARM:
        return
    import numpy as np
    import soundfile as sf

    noise = np.random.default_rng(0).standard_normal(settings.sample_rate).astype(np.float32) * 0.1
    buf = io.BytesIO()
    sf.write(buf, noise, settings.sample_rate, format="WAV", subtype="PCM_16")
    resolve(fn_path)(buf.getvalue(), settings=settings)
    try:  # the fallback decoder's libraries too, so no child pays for them
        import av  # noqa: F401
    except ImportError:
        pass
    _WARM.add(fn_path)


class ClipDecoder:
    """Fetch clips from storage and decode each in an :class:`IsolatedWorker`.

    >>> with ClipDecoder(storage, "deepcontent.audio.features:compute_log_mel", settings=s,
    ...                  timeout_s=60, memory_limit_mb=4096, max_bytes=256 << 20) as dec:
    ...     for i, data, failure in dec.fetch([(uri, size), ...]):
    ...         result = failure or dec.decode(data)      # a result dict or a Failure

    Parameters
    ----------
    storage : Storage
    fn_path : str
        ``"module:function"`` called as ``fn(data, settings=settings)`` in the child.
    settings : MelSettings
    timeout_s, memory_limit_mb : float, int
        Deadline per clip and the child's address-space limit.
    max_bytes : int
        Larger objects become ``Failure("too_long")`` without being read (memory bound).
    """

    def __init__(self, storage: "Storage", fn_path: str, *, settings, timeout_s: float, memory_limit_mb: int | None,
                 max_bytes: int) -> None:
        self.storage, self.settings, self.max_bytes = storage, settings, max_bytes
        warm_up(fn_path, settings)
        self._worker = IsolatedWorker(fn_path, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb)
        self._io = ThreadPoolExecutor(max_workers=1)

    def _read(self, uri: str, size: int | None) -> tuple[bytes | None, Failure | None]:
        if size is not None and size > self.max_bytes:  # never load an absurd object
            return None, Failure("too_long", f"object is {size:,} bytes, above the limit of {self.max_bytes:,} "
                                             f"(spectrograms.max_audio_bytes)")
        try:
            return self.storage.read_bytes(uri), None
        except Exception as exc:  # missing object, permissions, network: recorded, not fatal
            return None, Failure("unreadable", f"{type(exc).__name__}: {exc}"[:500])

    def fetch(self, items: Sequence[tuple[str, int | None]]) -> Iterator[tuple[int, bytes | None, Failure | None]]:
        """``(index, bytes or None, Failure or None)`` per ``(uri, size)``, in order; the next
        object is read while the caller decodes this one, so storage latency stays hidden."""
        pending = [self._io.submit(self._read, *items[0])] if items else []
        for i in range(len(items)):
            data, failure = pending.pop(0).result()
            if i + 1 < len(items):
                pending.append(self._io.submit(self._read, *items[i + 1]))
            yield i, data, failure

    def decode(self, data: bytes) -> Any:
        """The function's result for ``data``, or a :class:`Failure`."""
        return self._worker.call(data, settings=self.settings)

    def close(self) -> None:
        self._worker.close()
        self._io.shutdown(wait=True)

    def __enter__(self) -> "ClipDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
