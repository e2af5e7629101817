"""Run an untrusted decoder in a child process so that a hang or a crash costs one clip, not a job.

Audio decoders are native code fed with files from the outside world. A file that makes one
loop forever, exhaust memory or segfault would otherwise kill the Spark Python worker, fail the
task four times and take the job down with it. :class:`IsolatedWorker` keeps one forked child
per task, sends it one clip at a time over a pipe and waits with a deadline:

* the function raised :class:`~deepcontent.audio.features.AudioError` -> its ``reason``;
* the child did not answer in time -> ``timeout`` (the child is killed and replaced);
* the child died (signal, ``os.abort``, out of memory under its address-space limit) -> ``crashed``;
* any other exception -> ``undecodable`` with the exception text.

The bulk of each round trip — the clip's bytes in, the result's arrays out — goes through a
shared-memory file both processes map (:class:`SharedRegion`), and the pipe carries only small
messages: over a pipe alone, a 30 s clip's 0.5 MB in and 0.3 MB out cost ≈ 1.3 ms of the job's
≈ 40 ms per clip (pickles, 64 KB pipe writes, a context switch per write). Payloads larger than
:data:`SHARED_MAX_BYTES`, and platforms without ``memfd_create``, fall back to the pipe.

:class:`ClipDecoder` is what the stages use: it fetches clips from object storage (the next one
while the child decodes this one), turns a missing, unreadable or oversized object into a
:class:`Failure` without reading it, and warms the decoder up in the parent before the child is
forked. The spectrogram job, the waveform job and the evaluation's target sets all decode
through it.
"""

from __future__ import annotations

import io
import mmap
import multiprocessing as mp
import os
import pickle
import signal
import time
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


# The shared region starts small and grows to the largest payload seen, up to this bound; a
# larger payload (a clip of many minutes) crosses the pipe instead, so the region never holds
# more than this much of tmpfs memory per decoder.
SHARED_INITIAL_BYTES = 4 << 20
SHARED_MAX_BYTES = 64 << 20


class SharedRegion:
    """A growable shared-memory file (``memfd``) mapped by a parent and its forked child.

    The two processes take turns (request, then answer), so whoever writes first grows the file
    with :meth:`reserve` and the reader follows with :meth:`sync`; the file never shrinks, so a
    mapping is never left pointing past its end.

    >>> region = SharedRegion.create()          # before forking; None where unsupported
    >>> region.write([b"abc", b"de"])            # -> [3, 2]: lengths, laid out from offset 0
    >>> region.read_copies([3, 2])               # -> [bytearray(b"abc"), bytearray(b"de")]
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.map = mmap.mmap(fd, size)

    @classmethod
    def create(cls, size: int = SHARED_INITIAL_BYTES) -> "SharedRegion | None":
        if not hasattr(os, "memfd_create"):
            return None
        try:
            fd = os.memfd_create("deepcontent-decoder", 0)
            os.ftruncate(fd, size)
            return cls(fd, size)
        except OSError:  # no memfd support in this kernel / sandbox: the pipe carries everything
            return None

    def _remap(self, size: int) -> None:
        # A new mapping, never close(): the old one may still back views a caller holds; it is
        # unmapped when the last of them goes.
        self.map, self.size = mmap.mmap(self.fd, size), size

    def sync(self) -> None:
        """Follow a growth made by the other process."""
        size = os.fstat(self.fd).st_size
        if size != self.size:
            self._remap(size)

    def reserve(self, nbytes: int) -> None:
        """Grow the file (and this mapping) to hold ``nbytes``."""
        self.sync()
        if nbytes > self.size:
            size = max(nbytes, min(2 * self.size, SHARED_MAX_BYTES))
            os.ftruncate(self.fd, size)
            self._remap(size)

    def write(self, buffers) -> list[int]:
        """Lay ``buffers`` out back to back from offset 0; their lengths."""
        views = [memoryview(b).cast("B") for b in buffers]
        self.reserve(sum(v.nbytes for v in views))
        pos, lengths = 0, []
        for v in views:
            self.map[pos : pos + v.nbytes] = v
            pos += v.nbytes
            lengths.append(v.nbytes)
        return lengths

    def read_copies(self, lengths: list[int]) -> list[bytearray]:
        """Copies of the buffers :meth:`write` laid out (the region is reused by the next call)."""
        self.sync()
        out, pos = [], 0
        with memoryview(self.map) as view:
            for n in lengths:
                out.append(bytearray(view[pos : pos + n]))  # one copy (slicing the mmap would add one)
                pos += n
        return out

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _pack_result(out: Any, region: "SharedRegion | None") -> tuple[Any, list[int] | None]:
    """``(payload, lengths)``: the result pickled with its arrays' buffers out of band in
    ``region`` (protocol 5), or ``(out, None)`` to send it whole over the pipe."""
    if region is None:
        return out, None
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(out, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    if not raws or sum(r.nbytes for r in raws) > SHARED_MAX_BYTES:
        return out, None
    return payload, region.write(raws)


def _child(conn, fn_path: str, memory_limit_mb: int | None, region: "SharedRegion | None" = None) -> None:
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
        shared, args, kwargs = msg
        try:
            if shared is not None:  # the first argument waits in the shared region
                region.sync()
                args = (region.map[:shared], *args)  # bytes (a slice of an mmap is a copy), as before
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - t0
            payload, lengths = _pack_result(out, region)
            conn.send(("ok", payload, lengths, seconds))
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
        self._region = SharedRegion.create()  # shared with every child forked from here on
        self.restarts = 0
        # Seconds of the last successful call spent outside the function: pickling the
        # arguments and the result, the pipe both ways, scheduling (the job's ``ipc`` cost).
        self.last_ipc_s: float | None = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        self._proc = self._ctx.Process(target=_child, args=(child, self.fn_path, self.memory_limit_mb, self._region),
                                       daemon=True)
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
        self.last_ipc_s = None
        t0 = time.perf_counter()
        try:
            first = args[0] if args else None
            if (self._region is not None and isinstance(first, (bytes, bytearray, memoryview))
                    and memoryview(first).nbytes <= SHARED_MAX_BYTES):
                self._conn.send((self._region.write([first])[0], args[1:], kwargs))
            else:
                self._conn.send((None, args, kwargs))
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
            _, payload, lengths, seconds = msg
            out = payload if lengths is None else pickle.loads(payload, buffers=self._region.read_copies(lengths))
            self.last_ipc_s = max(0.0, time.perf_counter() - t0 - seconds)
            return out
        return Failure(msg[1], msg[2])

    def close(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=2)
            except (BrokenPipeError, OSError):
                pass
        self._kill()
        if self._region is not None:
            self._region.close()
            self._region = None

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
        self.last_read_s: float = 0.0  # wall seconds reading the object :meth:`fetch` yielded last

    @property
    def last_ipc_s(self) -> float | None:
        """Seconds the last :meth:`decode` spent outside the function (pickles and pipe)."""
        return self._worker.last_ipc_s

    def _read(self, uri: str, size: int | None) -> tuple[bytes | None, Failure | None, float]:
        if size is not None and size > self.max_bytes:  # never load an absurd object
            return None, Failure("too_long", f"object is {size:,} bytes, above the limit of {self.max_bytes:,} "
                                             f"(spectrograms.max_audio_bytes)"), 0.0
        t0 = time.perf_counter()
        try:
            return self.storage.read_bytes(uri), None, time.perf_counter() - t0
        except Exception as exc:  # missing object, permissions, network: recorded, not fatal
            return None, Failure("unreadable", f"{type(exc).__name__}: {exc}"[:500]), time.perf_counter() - t0

    def fetch(self, items: Sequence[tuple[str, int | None]]) -> Iterator[tuple[int, bytes | None, Failure | None]]:
        """``(index, bytes or None, Failure or None)`` per ``(uri, size)``, in order; the next
        object is read while the caller decodes this one, so storage latency stays hidden."""
        pending = [self._io.submit(self._read, *items[0])] if items else []
        for i in range(len(items)):
            data, failure, self.last_read_s = pending.pop(0).result()
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
