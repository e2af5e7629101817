"""Id maps, song splits and sparse matrices: the pure maths of the ``matrices`` stage.

Arrow / numpy / scipy.sparse in, the same out; no storage, no Spark.

* :func:`extend_index` / :func:`lookup` — stable id -> index maps: an id keeps its index
  across runs, new ids are appended in sorted order (a run is deterministic).
* :func:`assign_splits` — train / valid / test from a seeded hash of the song (or its artist).
* :func:`to_csr` / :func:`max_duplicates` — COO -> CSR with duplicates summed (plays) or the
  largest kept (tags: a song's several tagged tracks).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

__all__ = ["assign_splits", "extend_index", "hash_unit", "lookup", "max_duplicates", "save_npz_bytes", "to_csr"]

SPLIT_NAMES = ("train", "valid", "test")


def hash_unit(keys: list[str] | np.ndarray, *, seed: int) -> np.ndarray:
    """A stable pseudo-random number in [0, 1) per key (SHA-1 of ``seed:key``), shape ``(n,)``."""
    out = np.empty(len(keys), dtype=np.float64)
    prefix = f"{seed}:".encode()
    for i, k in enumerate(keys):
        out[i] = int.from_bytes(hashlib.sha1(prefix + k.encode()).digest()[:8], "big") / 2.0**64
    return out


def assign_splits(song_ids: list[str], *, seed: int, fractions: tuple[float, float, float],
                  group_keys: list[str] | None = None) -> np.ndarray:
    """``train``/``valid``/``test`` per song from a seeded hash of its group key (the song id
    itself, or e.g. its artist so a whole artist lands in one split). Shape ``(n,)`` str."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    u = hash_unit(group_keys if group_keys is not None else song_ids, seed=seed)
    cut1, cut2 = fractions[0], fractions[0] + fractions[1]
    return np.where(u < cut1, "train", np.where(u < cut2, "valid", "test"))


def extend_index(existing: pa.Table, ids: pa.Array, *, id_column: str) -> pa.Table:
    """Append ids not yet in ``existing`` (``id_column``, ``idx``) with the next indices, in sorted
    order; existing ids keep their index."""
    known = existing[id_column].combine_chunks() if existing.num_rows else pa.array([], pa.string())
    uniq = pc.unique(_flat(ids).cast(pa.string()))
    new = pc.filter(uniq, pc.invert(pc.is_in(uniq, value_set=known))) if len(known) else uniq
    new = pc.take(new, pc.array_sort_indices(new))
    start = int(pc.max(existing["idx"]).as_py()) + 1 if existing.num_rows else 0
    added = pa.table({id_column: new, "idx": pa.array(np.arange(start, start + len(new), dtype=np.int32))})
    return pa.concat_tables([existing.cast(added.schema), added]) if existing.num_rows else added


def _flat(a: pa.Array | pa.ChunkedArray) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def lookup(index: pa.Table, ids: pa.Array | pa.ChunkedArray, *, id_column: str) -> np.ndarray:
    """Index of each id (``-1`` where missing), shape ``(n,)`` int64."""
    pos = pc.index_in(_flat(ids), value_set=index[id_column].combine_chunks())
    idx = index["idx"].to_numpy()
    p = pos.to_numpy(zero_copy_only=False)
    out = np.full(len(ids), -1, dtype=np.int64)
    valid = ~np.isnan(p) if p.dtype.kind == "f" else np.ones(len(p), bool)
    out[valid] = idx[p[valid].astype(np.int64)]
    return out


def to_csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, *, shape: tuple[int, int]) -> sp.csr_matrix:
    """COO -> CSR float32 with duplicates summed, sorted indices."""
    m = sp.csr_matrix((values.astype(np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    m.sort_indices()
    return m


def save_npz_bytes(m: sp.csr_matrix) -> bytes:
    buf = io.BytesIO()
    sp.save_npz(buf, m, compressed=False)
    return buf.getvalue()


def max_duplicates(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """COO -> CSR float32 keeping the largest value of each repeated (row, col)."""
    if len(rows) == 0:
        return sp.csr_matrix(shape, dtype=np.float32)
    key = rows.astype(np.int64) * shape[1] + cols
    order = np.lexsort((-vals, key))
    key, vals = key[order], vals[order]
    first = np.concatenate([[True], key[1:] != key[:-1]])
    key, vals = key[first], vals[first]
    return sp.csr_matrix((vals.astype(np.float32), (key // shape[1], key % shape[1])), shape=shape)
