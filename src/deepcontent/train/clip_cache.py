"""A worker's clips within a byte budget: resident when they fit, spilled and streamed when not.

The training loop asks two things of a worker's clips (:class:`ClipBank` s, whatever the size
of its shard):

* ``epoch_fills(steps=, seed=)``: a sequence of ``(bank, steps_i)`` whose ``steps_i`` add up to
  the epoch's ``steps`` — the loop draws ``steps_i`` batches of random windows from each bank;
* ``banks()``: banks that together hold every clip once (validation).

:class:`ResidentClips` (the fast path)
    The whole shard in one bank, pulled once from Ray Data; an epoch is one fill of every clip,
    so the draws are exactly those of a bank without any budget.

:class:`SpilledClips` (a shard beyond its budget)
    The clips are written once, as they stream in, to a Parquet file on the worker's local disk
    (``train.spill_dir``): frames time-major and padded to the window, exactly as a bank holds
    them, in row groups of about ``group_bytes``. Each epoch the row groups are taken in a
    seeded random order and packed into fills of at most ``fill_bytes``; each fill gets its
    share of the epoch's steps (proportional to its clips: permutations of its clips, random
    window offsets), while a background thread reads the next fill into the other of two
    preallocated buffers. Clip memory is at most two fills = the budget, plus one row group.
    Reading is local and sequential per row group, so every rank refills without waiting for
    any other (DDP only needs the same number of steps on every rank, which the split keeps).

:func:`load_clips` turns a worker's stream of Arrow batches into one or the other.
:func:`cache_budgets` splits ``train.cache_bytes`` between a worker's train and valid clips.

Everything here is plain numpy / pyarrow / torch; nothing imports Ray.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from deepcontent.datasets import mel_arrays, vectors
from deepcontent.errors import TrainingDataError
from deepcontent.train.data import ClipBank

__all__ = ["ResidentClips", "SpilledClips", "cache_budgets", "clip_nbytes", "load_clips", "split_clip_bytes", "split_steps"]

#: Row groups of the spill file are about 1/32 of the split's budget, at most 64 MiB: small
#: enough that the shuffle has many pieces and a fill overshoots its size by little, large
#: enough that a read is one sequential chunk of the file.
GROUP_FRACTION = 32
MAX_GROUP_BYTES = 64 * 2**20

_SPILL_SCHEMA = pa.schema([("track_id", pa.string()), ("n_frames", pa.int64()), ("frames", pa.large_binary()),
                           ("target", pa.list_(pa.float32())), ("item_idx", pa.int64())])


def clip_nbytes(*, n_frames: int, n_mels: int, n_factors: int, min_frames: int) -> int:
    """Bytes one clip takes in a bank: its frames (float16, padded to ``min_frames``), its
    target (float32) and its item index."""
    return max(int(n_frames), int(min_frames)) * int(n_mels) * 2 + 4 * int(n_factors) + 8


def split_clip_bytes(n_frames: pa.ChunkedArray | pa.Array, *, n_mels: int, n_factors: int, min_frames: int) -> int:
    """Bank bytes (:func:`clip_nbytes`) of clips of lengths ``n_frames`` ``(n,)``; a null
    length counts as one window."""
    arr = n_frames.combine_chunks() if isinstance(n_frames, pa.ChunkedArray) else n_frames
    frames = arr.fill_null(min_frames).to_numpy(zero_copy_only=False).astype(np.int64)
    return int(np.maximum(frames, min_frames).sum()) * 2 * int(n_mels) + len(frames) * (4 * int(n_factors) + 8)


def cache_budgets(cache_bytes: int, *, train_bytes: int, valid_bytes: int) -> dict[str, int]:
    """``{"train": bytes, "valid": bytes}``: ``cache_bytes`` shared in proportion to the two
    splits' clip bytes over the whole catalog (the driver knows them; every rank gets the same
    shares, so which path a rank takes does not depend on timing), at least 1 byte each.

    >>> cache_budgets(100, train_bytes=800, valid_bytes=200)
    {'train': 80, 'valid': 20}
    """
    if cache_bytes < 2:
        raise ValueError(f"cache_bytes must be >= 2, got {cache_bytes!r}")
    total = int(train_bytes) + int(valid_bytes)
    valid = int(cache_bytes * valid_bytes / total) if total > 0 else cache_bytes // 2
    valid = min(max(valid, 1), cache_bytes - 1)
    return {"train": int(cache_bytes) - valid, "valid": valid}


def split_steps(steps: int, sizes: list[int]) -> list[int]:
    """``steps`` shared over fills in proportion to ``sizes`` (largest remainders; the shares
    add up to ``steps`` exactly).

    >>> split_steps(10, [3, 3, 4])
    [3, 3, 4]
    >>> sum(split_steps(7, [5, 1, 1, 2]))
    7
    """
    total = sum(sizes)
    if steps < 0 or total <= 0:
        raise ValueError(f"need steps >= 0 and some clips, got steps={steps!r}, sizes={sizes!r}")
    exact = np.asarray(sizes, dtype=np.float64) * steps / total
    share = np.floor(exact).astype(np.int64)
    short = steps - int(share.sum())
    share[np.argsort(-(exact - share), kind="stable")[:short]] += 1
    return share.tolist()


# ----------------------------------------------------------------------------- rows -> clips
@dataclass
class _Rows:
    """One Arrow batch as bank rows: ids, time-major padded frames, targets, items."""

    track_ids: list[str]
    frames: list[np.ndarray]  # (n_frames_i, n_mels) float16 each
    targets: np.ndarray  # (n, f) float32
    items: np.ndarray  # (n,) int64

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.frames) + self.targets.nbytes + self.items.nbytes


def _rows(batch: pa.Table | dict, *, min_frames: int, n_factors: int, n_mels: int) -> _Rows:
    """``(track_id, n_mels, n_frames, mel, target, item_idx)`` -> :class:`_Rows` (frames
    transposed to time-major and zero-padded to ``min_frames``).

    Raises
    ------
    ValueError
        Naming the track, for a band count other than ``n_mels``, a blob of the wrong size or a
        target of the wrong length.
    """
    if isinstance(batch, dict):
        batch = pa.table(batch)
    ids = batch["track_id"].to_pylist()
    targets = vectors(batch["target"], width=n_factors)
    if len(ids) and targets.shape[1] != n_factors:
        raise ValueError(f"track {ids[0]!r}: target has {targets.shape[1]} factors, expected {n_factors}")
    for track, m in zip(ids, batch["n_mels"].to_pylist()):
        if m != n_mels:
            raise ValueError(f"track {track!r}: spectrogram has n_mels={m}, expected {n_mels}")
    frames = []
    for mel in mel_arrays(batch):  # sizes checked there, naming the track
        mel = mel.T  # (n_frames, n_mels)
        if mel.shape[0] < min_frames:  # silence up to one window
            mel = np.concatenate([mel, np.zeros((min_frames - mel.shape[0], n_mels), np.float16)], axis=0)
        frames.append(np.ascontiguousarray(mel))
    items = np.asarray(batch["item_idx"].to_numpy(zero_copy_only=False), dtype=np.int64)
    return _Rows(ids, frames, targets, items)


def _bank(track_ids: list[str], frames: torch.Tensor, lengths: np.ndarray, targets: np.ndarray,
          items: np.ndarray) -> ClipBank:
    """A bank over ``frames`` ``(sum(lengths), n_mels)`` (not copied)."""
    lengths_t = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
    offsets = torch.zeros_like(lengths_t)
    if len(lengths_t):
        offsets[1:] = torch.cumsum(lengths_t, 0)[:-1]
    return ClipBank(frames=frames, offsets=offsets, lengths=lengths_t,
                    targets=torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)),
                    items=torch.from_numpy(np.asarray(items, dtype=np.int64)), track_ids=list(track_ids))


class _FrameBuffer:
    """Frames appended back to back into one preallocated ``(capacity, n_mels)`` array.

    The array is reserved, not touched: the kernel backs only the rows written, so a buffer
    sized for a whole budget costs what the clips in it cost, and the bank is a view of it
    (no final concatenation, which would hold the clips twice)."""

    def __init__(self, *, capacity_frames: int, n_mels: int) -> None:
        self.array = np.empty((max(int(capacity_frames), 0), n_mels), dtype=np.float16)
        self.used = 0

    def append(self, frames: np.ndarray) -> None:
        n = frames.shape[0]
        self.array[self.used:self.used + n] = frames
        self.used += n

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.array[:self.used])


# ----------------------------------------------------------------------------- resident
class ResidentClips:
    """The fast path: every clip of the shard in one :class:`ClipBank`.

    Attributes
    ----------
    bank : ClipBank
    nbytes : int
        Clip bytes held (:func:`clip_nbytes` summed).
    """

    mode = "resident"

    def __init__(self, bank: ClipBank, *, nbytes: int) -> None:
        self.bank, self.nbytes = bank, int(nbytes)

    def __len__(self) -> int:
        return len(self.bank)

    @property
    def held_bytes(self) -> int:
        """Clip bytes held for the whole run."""
        return self.nbytes

    def to(self, device: torch.device, *, move: Callable | None = None) -> "ResidentClips":
        """The clips on ``device`` (``move(tensor, device)`` does the copy)."""
        return ResidentClips(self.bank.to(device, move=move), nbytes=self.nbytes)

    def epoch_fills(self, *, steps: int, seed: int) -> Iterator[tuple[ClipBank, int]]:
        """One fill: the whole bank with all of the epoch's ``steps``."""
        yield self.bank, steps

    def banks(self) -> Iterator[ClipBank]:
        yield self.bank

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- spilled
class _SpillWriter:
    """Bank rows -> a local Parquet file in row groups of about ``group_bytes`` each (a clip
    larger than that is a row group of its own)."""

    def __init__(self, path: str, *, group_bytes: int) -> None:
        self.path, self.group_bytes = path, max(1, int(group_bytes))
        self._writer: pq.ParquetWriter | None = None
        self._ids: list[str] = []
        self._frames: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []
        self._items: list[int] = []
        self._pending_bytes = 0
        self.n_clips = 0

    def add(self, rows: _Rows) -> None:
        for i, track in enumerate(rows.track_ids):
            f, t = rows.frames[i], rows.targets[i]
            self._ids.append(track)
            self._frames.append(f)
            self._targets.append(t)
            self._items.append(int(rows.items[i]))
            self._pending_bytes += f.nbytes + t.nbytes + 8
            if self._pending_bytes >= self.group_bytes:
                self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        frames, n = self._frames, len(self._ids)
        sizes = np.fromiter((f.nbytes for f in frames), dtype=np.int64, count=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        data = np.concatenate([f.reshape(-1) for f in frames]).view(np.uint8)  # frames back to back, as a bank holds them
        blobs = pa.LargeBinaryArray.from_buffers(pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
        targets = np.stack(self._targets).astype(np.float32, copy=False)
        lists = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * targets.shape[1]),
                                         pa.array(targets.reshape(-1), pa.float32()))
        table = pa.table([pa.array(self._ids, pa.string()), pa.array([f.shape[0] for f in frames], pa.int64()), blobs,
                          lists, pa.array(self._items, pa.int64())], schema=_SPILL_SCHEMA)
        try:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.path, _SPILL_SCHEMA, compression="none", use_dictionary=False,
                                                write_statistics=False)
            self._writer.write_table(table, row_group_size=n)  # one row group per flush
        except OSError as exc:
            raise TrainingDataError(
                f"could not spill training clips to {self.path} ({exc}); the worker's clips exceed train.cache_bytes "
                f"and the rest go to local disk: free space there, point train.spill_dir at a larger volume, or raise "
                f"train.cache_bytes") from exc
        self.n_clips += n
        self._ids, self._frames, self._targets, self._items, self._pending_bytes = [], [], [], [], 0

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        elif not os.path.exists(self.path):  # nothing spilled: an empty file keeps readers simple
            pq.write_table(_SPILL_SCHEMA.empty_table(), self.path)


class SpilledClips:
    """Clips in a local Parquet file, read back a fill at a time (see the module docstring).

    Parameters
    ----------
    path : str
        The spill file (:data:`_SPILL_SCHEMA`, one row group per write).
    n_mels : int
    fill_bytes : int
        Clip bytes of one fill; two fills are held at once (the one training, the one being
        read). A row group larger than this is a fill of its own.
    device : torch.device
        Where fills are trained on (copied there from the host buffers).
    move : callable, optional
        ``move(tensor, device)``, as :meth:`ClipBank.to`.
    """

    mode = "streaming"

    def __init__(self, path: str, *, n_mels: int, fill_bytes: int, device: torch.device | str = "cpu",
                 move: Callable | None = None) -> None:
        self.path, self.n_mels, self.fill_bytes = path, int(n_mels), max(1, int(fill_bytes))
        self.device, self.move = torch.device(device), move
        meta = pq.ParquetFile(path).metadata
        pf = pq.ParquetFile(path)
        self.group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_frames = [int(np.sum(pf.read_row_group(g, columns=["n_frames"])["n_frames"].to_numpy()))
                             for g in range(meta.num_row_groups)]
        self.nbytes = 0  # nothing is held between fills
        self._capacity = max([self._fill_frames_cap(), *self.group_frames, 1])
        # Reserved, not touched: the kernel backs what fills use (see _FrameBuffer).
        self._slots = [np.empty((self._capacity, self.n_mels), np.float16) for _ in range(2)]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clip-fill")
        self._lock = threading.Lock()

    def _fill_frames_cap(self) -> int:
        return self.fill_bytes // (2 * self.n_mels)

    def __len__(self) -> int:
        return sum(self.group_rows)

    @property
    def held_bytes(self) -> int:
        """Host buffer bytes of the two fills (what streaming holds at most)."""
        return sum(s.nbytes for s in self._slots)

    def to(self, device: torch.device, *, move: Callable | None = None) -> "SpilledClips":
        """Fills go to ``device``. On a GPU the two host buffers are pinned once, so each fill
        is one direct copy (``move`` is not needed there)."""
        self.device, self.move = torch.device(device), move
        if self.device.type == "cuda":
            self._slots = [torch.empty((self._capacity, self.n_mels), dtype=torch.float16, pin_memory=True).numpy()
                           for _ in range(2)]
        return self

    def _fills(self, order: Iterable[int]) -> list[list[int]]:
        """Row groups in ``order`` packed into fills of at most ``fill_bytes`` of frames (a
        larger group alone)."""
        cap = self._fill_frames_cap()
        fills: list[list[int]] = []
        frames = 0
        for g in order:
            if self.group_rows[g] == 0:
                continue
            if fills and frames + self.group_frames[g] <= cap:
                fills[-1].append(g)
                frames += self.group_frames[g]
            else:
                fills.append([g])
                frames = self.group_frames[g]
        return fills

    def _read(self, groups: list[int], slot: int) -> ClipBank:
        """Read ``groups`` into host buffer ``slot`` and make the fill's bank on the device."""
        buf = self._slots[slot]
        pf = pq.ParquetFile(self.path)
        ids, lengths, targets, items, used = [], [], [], [], 0
        for g in groups:
            t = pf.read_row_group(g)
            for chunk in t["frames"].chunks:
                _, offsets_buf, data_buf = chunk.buffers()
                offsets = np.frombuffer(offsets_buf, np.int64)[chunk.offset:chunk.offset + len(chunk) + 1]
                n_values = int(offsets[-1] - offsets[0]) // 2
                values = np.frombuffer(data_buf, np.float16, count=n_values, offset=int(offsets[0]))
                n = n_values // self.n_mels
                buf[used:used + n] = values.reshape(n, self.n_mels)
                used += n
            ids.extend(t["track_id"].to_pylist())
            lengths.append(t["n_frames"].to_numpy())
            targets.append(vectors(t["target"]))
            items.append(t["item_idx"].to_numpy())
        bank = _bank(ids, torch.from_numpy(buf[:used]), np.concatenate(lengths), np.concatenate(targets),
                     np.concatenate(items))
        if self.device.type != "cpu":
            bank = bank.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the host buffer is refilled next: the copy must be done
        return bank

    def _stream(self, fills: list[list[int]]) -> Iterator[ClipBank]:
        """Banks of ``fills`` in order, the next one read while the current one is used."""
        if not fills:
            return
        with self._lock:  # one stream at a time: the two buffers are shared
            future = self._pool.submit(self._read, fills[0], 0)
            for i in range(len(fills)):
                bank = future.result()
                if i + 1 < len(fills):
                    # the other buffer held fill i-1, whose steps are done
                    future = self._pool.submit(self._read, fills[i + 1], (i + 1) % 2)
                yield bank
                del bank

    def epoch_fills(self, *, steps: int, seed: int) -> Iterator[tuple[ClipBank, int]]:
        """The epoch's fills in a random order of row groups (seeded by ``seed``) with their
        shares of ``steps``; fills whose share is 0 are not read."""
        order = np.random.default_rng(seed).permutation(len(self.group_rows))
        fills = self._fills(order.tolist())
        shares = split_steps(steps, [sum(self.group_rows[g] for g in f) for f in fills])
        kept = [(f, s) for f, s in zip(fills, shares) if s > 0]
        for bank, (_, s) in zip(self._stream([f for f, _ in kept]), kept):
            yield bank, s

    def banks(self) -> Iterator[ClipBank]:
        """Every clip once, a fill at a time, in file order."""
        yield from self._stream(self._fills(range(len(self.group_rows))))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._slots = []
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# ----------------------------------------------------------------------------- loading
def load_clips(batches: Iterable[pa.Table | dict], *, budget_bytes: int | None, spill_path: str | None,
               min_frames: int, n_factors: int, n_mels: int) -> ResidentClips | SpilledClips:
    """A worker's clips from its stream of Arrow batches, resident while they fit.

    Parameters
    ----------
    batches : iterable of pa.Table
        ``(track_id, n_mels, n_frames, mel, target, item_idx)`` rows.
    budget_bytes : int or None
        Clip bytes (:func:`clip_nbytes`) this split may hold; None = no limit.
    spill_path : str or None
        Where the clips go once the budget is exceeded (a local file; its directory must
        exist); needed when ``budget_bytes`` is set.
    min_frames, n_factors, n_mels : int
        Window length (shorter clips are zero-padded to it), target length, band count.

    Returns
    -------
    ResidentClips or SpilledClips
        Spilled clips are on the host; give them their device and fill size with
        :meth:`SpilledClips.to` (the caller decides how much of the budget a fill gets).

    Raises
    ------
    ValueError
        As :meth:`ClipBank.from_batches`, naming the track.
    TrainingDataError
        If the spill file cannot be written (disk full), naming it and the settings to change.
    """
    if budget_bytes is not None and spill_path is None:
        raise ValueError("load_clips: a budget needs a spill_path for the clips beyond it")
    per_frame = 2 * n_mels
    capacity = (budget_bytes // per_frame) if budget_bytes is not None else None
    buffer = _FrameBuffer(capacity_frames=capacity, n_mels=n_mels) if capacity is not None else None
    chunks: list[np.ndarray] = []  # no budget: frames collected, concatenated once
    ids: list[str] = []
    lengths: list[int] = []
    targets: list[np.ndarray] = []
    items: list[np.ndarray] = []
    held = 0
    writer: _SpillWriter | None = None
    for batch in batches:
        rows = _rows(batch, min_frames=min_frames, n_factors=n_factors, n_mels=n_mels)
        if not rows.track_ids:
            continue
        if writer is None and budget_bytes is not None and held + rows.nbytes > budget_bytes:
            group = min(max(budget_bytes // GROUP_FRACTION, 1), MAX_GROUP_BYTES)
            writer = _SpillWriter(spill_path, group_bytes=group)
            if ids:  # what was resident goes first, then the buffer is released
                frames = buffer.array[:buffer.used]
                cuts = np.cumsum([0, *lengths])
                writer.add(_Rows(ids, [frames[a:b] for a, b in zip(cuts[:-1], cuts[1:])], np.concatenate(targets),
                                 np.concatenate(items)))
            buffer, ids, lengths, targets, items, held = None, [], [], [], [], 0
        if writer is not None:
            writer.add(rows)
            continue
        for f in rows.frames:
            if buffer is not None:
                buffer.append(f)
            else:
                chunks.append(f)
            lengths.append(f.shape[0])
        ids.extend(rows.track_ids)
        targets.append(rows.targets)
        items.append(rows.items)
        held += rows.nbytes
    if writer is not None:
        writer.close()
        return SpilledClips(spill_path, n_mels=n_mels, fill_bytes=budget_bytes // 2)
    if buffer is not None:
        frames = buffer.tensor()
    else:
        frames = torch.from_numpy(np.concatenate(chunks, axis=0)) if chunks else torch.zeros((0, n_mels), dtype=torch.float16)
    bank = _bank(ids, frames, np.asarray(lengths, np.int64),
                 np.concatenate(targets) if targets else np.zeros((0, n_factors), np.float32),
                 np.concatenate(items) if items else np.zeros(0, np.int64))
    return ResidentClips(bank, nbytes=held)
