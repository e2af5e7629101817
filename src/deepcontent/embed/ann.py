"""Approximate nearest neighbours by cosine similarity (faiss), and how good they are.

Exact search (:func:`deepcontent.embed.similarity.top_k_cosine`) costs ``n² d`` multiply-adds:
about 2.6 hours on one process at a million tracks. Beyond ``neighbors.exact_max_tracks`` the
``neighbors`` stage builds a faiss index over the L2-normalised vectors instead (inner product
of unit vectors = cosine) and searches it for every track:

* ``hnsw`` — a graph index (``IndexHNSWFlat``): no training, high recall at moderate memory
  (``M`` links per vector); the default.
* ``ivf`` — an inverted file (``IndexIVFFlat``): k-means cells trained on a sample, ``nprobe``
  cells searched per query; cheaper to build at many millions of vectors.

Either way a seeded sample of queries is searched exactly as well and :func:`recall_at_k`
measures how many of the true neighbours the index found; the stage fails below
``neighbors.min_recall``. Everything here is numpy in, numpy out; the index travels as bytes
(:func:`index_to_bytes`) to query tasks and to object storage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepcontent.embed.similarity import unit_rows

__all__ = [
    "IndexSpec",
    "build_index",
    "choose_method",
    "exact_neighbors_of",
    "index_from_bytes",
    "index_to_bytes",
    "recall_at_k",
    "row_hashes",
    "sample_queries",
    "search_effort_key",
    "search_index",
    "set_search_effort",
    "top_k_columns",
    "unit_rows",
]


@dataclass(frozen=True)
class IndexSpec:
    """Which index and its parameters.

    Attributes
    ----------
    method : {"exact", "hnsw", "ivf"}
    params : dict
        ``hnsw``: ``m`` (links per vector), ``ef_construction``, ``ef_search``.
        ``ivf``: ``nlist`` (cells), ``nprobe`` (cells searched), ``train_size`` (vectors the
        k-means sees).
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)


def choose_method(n: int, *, exact_max_tracks: int, index: str) -> str:
    """``"exact"`` up to ``exact_max_tracks`` vectors, else ``index`` (``"hnsw"`` or ``"ivf"``;
    ``"exact"`` forces exact search at any size)."""
    if index not in ("exact", "hnsw", "ivf"):
        raise ValueError(f"index must be 'exact', 'hnsw' or 'ivf', got {index!r}")
    return "exact" if index == "exact" or n <= exact_max_tracks else index


def default_params(method: str, *, n: int, k: int) -> dict[str, Any]:
    """Parameters that reach recall@10 >= 0.95 on clustered 50-d vectors (measured by
    ``tests/benchmarks/bench_neighbors.py``); ``ef_search`` / ``nprobe`` grow with ``k``."""
    if method == "hnsw":
        return {"m": 32, "ef_construction": 64, "ef_search": max(64, 4 * k)}
    if method == "ivf":
        nlist = int(max(16, min(65536, 4 * np.sqrt(n))))
        return {"nlist": nlist, "nprobe": max(16, nlist // 64), "train_size": min(n, 64 * nlist)}
    return {}


def search_effort_key(method: str) -> str:
    """The search-time parameter that trades speed for recall: ``ef_search`` (candidates kept
    while walking the HNSW graph) or ``nprobe`` (IVF cells visited per query)."""
    if method == "hnsw":
        return "ef_search"
    if method == "ivf":
        return "nprobe"
    raise ValueError(f"no search effort for method {method!r}")


def set_search_effort(index, *, method: str, value: int) -> int:
    """Set the index's search effort (:func:`search_effort_key`) in place; returns the value
    set (an IVF index visits at most its ``nlist`` cells)."""
    if method == "hnsw":
        index.hnsw.efSearch = int(value)
        return int(index.hnsw.efSearch)
    if method == "ivf":
        index.nprobe = int(min(value, index.nlist))
        return int(index.nprobe)
    raise ValueError(f"no search effort for method {method!r}")


def build_index(unit: np.ndarray, *, spec: IndexSpec, seed: int = 0, threads: int | None = None):
    """A faiss index over ``unit`` (rows of :func:`unit_rows`), inner-product metric.

    Parameters
    ----------
    unit : np.ndarray [shape=(n, d), dtype=float32]
    spec : IndexSpec
        ``hnsw`` or ``ivf`` (exact search needs no index).
    seed : int
        Seeds the IVF training sample and k-means (HNSW's level draw is faiss's own, fixed).
    threads : int, optional
        OpenMP threads for the build (faiss's default: all cores).

    Returns
    -------
    faiss.Index
    """
    import faiss

    if threads:
        faiss.omp_set_num_threads(int(threads))
    x = np.ascontiguousarray(unit, dtype=np.float32)
    n, d = x.shape
    p = spec.params
    if spec.method == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(p["m"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(p["ef_construction"])
        index.add(x)
        index.hnsw.efSearch = int(p["ef_search"])
        return index
    if spec.method == "ivf":
        nlist = min(int(p["nlist"]), n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x[np.sort(rng.choice(n, size=min(n, int(p["train_size"])), replace=False))]
        index.cp.seed = int(seed)
        index.train(sample)
        index.add(x)
        index.nprobe = min(int(p["nprobe"]), nlist)
        return index
    raise ValueError(f"no index to build for method {spec.method!r}")


def index_to_bytes(index) -> np.ndarray:
    """The index serialised (faiss's own format) as a uint8 array."""
    import faiss

    return faiss.serialize_index(index)


def index_from_bytes(data) -> Any:
    """The inverse of :func:`index_to_bytes` (``data``: uint8 array or bytes). Search-time
    parameters (``efSearch``, ``nprobe``) are part of the serialised index."""
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data)


def search_index(index, unit: np.ndarray, rows: np.ndarray | slice, *, k: int, batch_rows: int = 65536,
                 self_rows: np.ndarray | None = None, exclude: np.ndarray | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar *other* rows of the rows ``rows`` of ``unit``, by the index.

    Parameters
    ----------
    index : faiss.Index
        Built over all of ``unit`` (row i of ``unit`` is id i in the index), unless
        ``self_rows`` says where each query sits in it.
    unit : np.ndarray [shape=(n, d), dtype=float32]
    rows : np.ndarray [shape=(q,)] or slice
        Which rows of ``unit`` to query.
    k : int >= 1
        Neighbours per row; at most ``n - 1``.
    batch_rows : int
        Queries per faiss call (bounds the result buffers).
    self_rows : np.ndarray [shape=(q,), dtype=int64], optional
        The index id of each query's own vector, never returned (default: ``rows``). An index
        updated in place (:mod:`deepcontent.embed.neighbor_update`) has ids that are not rows
        of ``unit``.
    exclude : np.ndarray [shape=(m,), dtype=int64], optional
        Index ids never returned (the dead rows of an updated index).

    Returns
    -------
    neighbors : np.ndarray [shape=(q, min(k, n - 1)), dtype=int64]
        Index ids, most similar first, never the query itself. Where the index returns fewer
        than ``k`` other rows (a tiny or disconnected index) the rest is -1.
    scores : np.ndarray [shape=(q, min(k, n - 1)), dtype=float32]
        Inner products of unit vectors (cosine); -inf where the neighbour is -1.
    """
    n = unit.shape[0]
    ids = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
    selfs = ids if self_rows is None else np.asarray(self_rows, dtype=np.int64)
    if len(selfs) != len(ids):
        raise ValueError(f"self_rows has {len(selfs)} ids for {len(ids)} queries")
    kk = min(k, n - 1)
    out_idx = np.full((len(ids), kk), -1, np.int64)
    out_score = np.full((len(ids), kk), -np.inf, np.float32)
    if kk <= 0:
        return out_idx[:, :0], out_score[:, :0]
    params = _search_params(index, exclude)
    for s in range(0, len(ids), batch_rows):
        q, me = ids[s : s + batch_rows], selfs[s : s + batch_rows]
        x = np.ascontiguousarray(unit[q])
        scores, found = index.search(x, kk + 1) if params is None else index.search(x, kk + 1, params=params)
        # Drop the query itself wherever it is (duplicates may outrank it); otherwise the last.
        is_self = found == me[:, None]
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), kk)
        keep = np.ones_like(found, dtype=bool)
        keep[np.arange(len(q)), drop] = False
        found, scores = found[keep].reshape(len(q), kk), scores[keep].reshape(len(q), kk)
        scores = np.where(found >= 0, scores, -np.inf).astype(np.float32)
        # faiss orders by score only; order ties by index like the exact search does.
        order = np.lexsort((np.where(found >= 0, found, np.iinfo(np.int64).max), -scores), axis=1)
        out_idx[s : s + len(q)] = np.take_along_axis(found, order, axis=1)
        out_score[s : s + len(q)] = np.take_along_axis(scores, order, axis=1)
    return out_idx, out_score


def _search_params(index, exclude: np.ndarray | None):
    """faiss search parameters that skip the ids ``exclude`` (None when there are none), with
    the index's own search effort."""
    if exclude is None or len(exclude) == 0:
        return None
    import faiss

    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64)))
    if hasattr(index, "hnsw"):
        params = faiss.SearchParametersHNSW()
        params.efSearch = index.hnsw.efSearch
    elif hasattr(index, "nprobe"):
        params = faiss.SearchParametersIVF()
        params.nprobe = index.nprobe
    else:
        params = faiss.SearchParameters()
    params.sel = selector
    params._keep = selector  # the parameters hold a raw pointer: keep the selector alive with them
    return params


def row_hashes(unit: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's float32 bytes: tells an unchanged vector from a changed one
    without keeping the vectors.

    Parameters
    ----------
    unit : np.ndarray [shape=(n, d), dtype=float32]

    Returns
    -------
    hashes : np.ndarray [shape=(n,), dtype=uint64]
    """
    words = np.ascontiguousarray(unit, dtype=np.float32).view(np.uint32).astype(np.uint64)
    h = np.full(words.shape[0], 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):  # FNV-1a over 32-bit words, one column at a time
            h = (h ^ words[:, j]) * prime
    return h


def sample_queries(n: int, *, size: int, seed: int) -> np.ndarray:
    """``min(size, n)`` distinct row indices drawn with ``seed``, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False)).astype(np.int64)


def exact_neighbors_of(unit: np.ndarray, rows: np.ndarray, *, k: int, block_bytes: int = 256 << 20) -> np.ndarray:
    """Exact top-``k`` other rows of the rows ``rows`` (the recall reference).

    Parameters
    ----------
    unit : np.ndarray [shape=(n, d), dtype=float32]
    rows : np.ndarray [shape=(q,), dtype=int64]

    Returns
    -------
    neighbors : np.ndarray [shape=(q, min(k, n - 1)), dtype=int64]
        The same sets as :func:`~deepcontent.embed.similarity.top_k_cosine` gives for those rows
        (among scores tied exactly at the k-th place, either keeps an arbitrary subset), most
        similar first, ties by row.
    """
    n = unit.shape[0]
    kk = min(k, n - 1)
    out = np.empty((len(rows), kk), np.int64)
    # Queries per product so the (b, n) similarities stay within block_bytes: 335 rows at
    # 200,000 tracks, 64 at a million.
    block_rows = max(1, min(1024, block_bytes // (4 * n)))
    for s in range(0, len(rows), block_rows):
        q = rows[s : s + block_rows]
        sims = unit[q] @ unit.T
        sims[np.arange(len(q)), q] = -np.inf
        out[s : s + len(q)] = top_k_columns(sims, k=kk)
    return out


def top_k_columns(sims: np.ndarray, *, k: int, width: int = 64) -> np.ndarray:
    """The columns of each row's ``k`` largest values, largest first, ties by column.

    A partial sort of every row (``argpartition``) costs ~10 ns per value, most of an exact
    recall check at catalog scale. Instead the columns are dealt into ``n // width`` groups
    (group g: columns g, g + n // width, ...), each group's maximum is taken (row-contiguous
    element-wise maxima, cheap) and only the ``k`` groups with the largest maxima are searched:
    an element among the ``k`` largest lies in one of them, since every group ranked above its
    own holds a distinct larger element and there are fewer than ``k`` of those.

    Parameters
    ----------
    sims : np.ndarray [shape=(b, n), dtype=float32]
    k : int, 1 <= k <= n

    Returns
    -------
    columns : np.ndarray [shape=(b, k), dtype=int64]
    """
    b, n = sims.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} columns, got {k}")
    groups = n // width
    if groups < 4 * k:  # too few groups to prune: a partial sort of whole rows
        cand = np.argpartition(sims, n - k, axis=1)[:, n - k:] if k < n else np.broadcast_to(np.arange(n), (b, n))
    else:
        tops = sims[:, :groups].copy()
        for i in range(1, width):
            np.maximum(tops, sims[:, i * groups : (i + 1) * groups], out=tops)
        best = np.argpartition(tops, groups - k, axis=1)[:, groups - k:]  # (b, k) group numbers
        cand = (best[:, :, None] + groups * np.arange(width)).reshape(b, k * width)
        tail = np.arange(groups * width, n)  # the last n % width columns are in no group
        cand = np.concatenate([cand, np.broadcast_to(tail, (b, len(tail)))], axis=1)
    order = np.lexsort((cand, -np.take_along_axis(sims, cand, axis=1)), axis=1)[:, :k]
    return np.take_along_axis(cand, order, axis=1).astype(np.int64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of ``|found_i ∩ truth_i| / |truth_i|``.

    Parameters
    ----------
    found, truth : np.ndarray [shape=(q, k), dtype=int64]
        Neighbour ids per query (-1 = none, never matches).

    Returns
    -------
    recall : float in [0, 1] (1.0 for no queries)
    """
    if found.shape != truth.shape:
        raise ValueError(f"found {found.shape} and truth {truth.shape} must have the same shape")
    if found.size == 0:
        return 1.0
    hits = sum(len(np.intersect1d(f[f >= 0], t)) for f, t in zip(found, truth))
    return float(hits / truth.size)
