"""Approximate neighbours (faiss) and the neighbors stage's choice between exact and approximate.

The stage tests put embeddings rows straight into the warehouse (no model, no audio): the stage
only reads the table, so a registered model is not needed when ``embed.model_version`` is given.
"""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from deepcontent.datasets import vector_column
from deepcontent.embed import ann
from deepcontent.embed.similarity import top_k_cosine
from support import config_for, run_stage

VERSION = "test-model-v1"


def clustered(n: int, d: int = 16, *, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 50, 4), d))
    return (centres[rng.integers(0, len(centres), n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("method", ["hnsw", "ivf"])
def test_index_finds_the_exact_neighbours(method):
    unit = ann.unit_rows(clustered(3000))
    spec = ann.IndexSpec(method, ann.default_params(method, n=3000, k=10))
    idx, score = ann.search_index(ann.build_index(unit, spec=spec), unit, slice(None), k=10)
    assert idx.shape == score.shape == (3000, 10)
    assert not (idx == np.arange(3000)[:, None]).any()  # never yourself
    assert (np.diff(score, axis=1) <= 1e-6).all()  # most similar first
    truth, _ = top_k_cosine(unit, k=10)
    assert ann.recall_at_k(idx, truth) >= 0.95
    # the scores are the cosines of the pairs found
    rows = np.arange(3000)[:, None]
    np.testing.assert_allclose(score, np.einsum("ijk,ik->ij", unit[idx], unit[rows[:, 0]]), atol=1e-5)


def test_duplicates_and_self_are_handled():
    # Three identical vectors: each must get the other two, never itself, ties by lower index.
    x = np.vstack([np.ones((3, 4)), clustered(200, 4, seed=1)]).astype(np.float32)
    unit = ann.unit_rows(x)
    index = ann.build_index(unit, spec=ann.IndexSpec("hnsw", ann.default_params("hnsw", n=len(x), k=2)))
    idx, score = ann.search_index(index, unit, np.array([0, 1, 2]), k=2)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1]]
    np.testing.assert_allclose(score, 1.0, atol=1e-6)


def test_recall_and_sampling():
    truth = np.array([[1, 2], [0, 2]])
    assert ann.recall_at_k(truth, truth) == 1.0
    assert ann.recall_at_k(np.array([[1, -1], [3, 4]]), truth) == 0.25
    a, b = ann.sample_queries(100, size=10, seed=3), ann.sample_queries(100, size=10, seed=3)
    assert (a == b).all() and len(set(a)) == 10 and ann.sample_queries(5, size=10, seed=0).tolist() == [0, 1, 2, 3, 4]
    unit = ann.unit_rows(clustered(500))
    exact, _ = top_k_cosine(unit, k=5)
    assert (ann.exact_neighbors_of(unit, a, k=5) == exact[a]).all()


def test_top_k_columns_prunes_by_group_maxima_and_keeps_the_exact_top_k():
    rng = np.random.default_rng(4)
    # Continuous values: the k largest per row, exactly as a full sort gives them. 5,003 columns
    # make 78 groups of 64 (the pruned path) and a tail of 11 columns that belong to no group.
    sims = rng.standard_normal((40, 5003)).astype(np.float32)
    sims[3, 5000] = 9.0  # a winner in the tail
    sims[4, :] = -np.inf
    sims[4, [7, 4000]] = 0.0  # fewer finite values than k: then any distinct -inf columns
    got = ann.top_k_columns(sims, k=10)
    full = np.lexsort((np.broadcast_to(np.arange(5003), sims.shape), -sims), axis=1)[:, :10]
    others = np.arange(40) != 4
    assert (got[others] == full[others]).all() and got[3, 0] == 5000
    assert got[4, :2].tolist() == [7, 4000] and len(set(got[4].tolist())) == 10
    # Heavy ties (few distinct values): the values are the top-k values, ordered, ties by column.
    ties = rng.integers(0, 6, size=(30, 4096)).astype(np.float32)
    got = ann.top_k_columns(ties, k=12)
    vals = np.take_along_axis(ties, got, axis=1)
    assert (vals == -np.sort(-ties, axis=1)[:, :12]).all()
    assert all(len(set(r)) == 12 for r in got.tolist())
    assert (np.lexsort((got, -vals), axis=1) == np.arange(12)).all()
    # Too few groups to prune, and k = n: the whole row sorted.
    small = rng.standard_normal((3, 50)).astype(np.float32)
    assert (ann.top_k_columns(small, k=50) == np.argsort(-small, axis=1, kind="stable")).all()
    with pytest.raises(ValueError, match="got 0"):
        ann.top_k_columns(small, k=0)


def test_exact_neighbors_of_equals_top_k_cosine_on_the_pruned_path():
    unit = ann.unit_rows(clustered(6000, d=16, seed=5))
    rows = ann.sample_queries(6000, size=300, seed=1)
    exact, _ = top_k_cosine(unit, k=10)
    assert (ann.exact_neighbors_of(unit, rows, k=10, block_bytes=4 * 6000 * 64) == exact[rows]).all()


def test_choose_method_and_bad_values():
    assert ann.choose_method(50_000, exact_max_tracks=50_000, index="hnsw") == "exact"
    assert ann.choose_method(50_001, exact_max_tracks=50_000, index="ivf") == "ivf"
    assert ann.choose_method(10**7, exact_max_tracks=10, index="exact") == "exact"
    with pytest.raises(ValueError, match="'annoy'"):
        ann.choose_method(10, exact_max_tracks=1, index="annoy")
    with pytest.raises(ValueError, match="1 row"):
        ann.unit_rows(np.array([[1.0, np.inf], [0.0, 1.0]]))
    index = ann.build_index(ann.unit_rows(clustered(100)), spec=ann.IndexSpec("hnsw", ann.default_params("hnsw", n=100, k=3)))
    again = ann.index_from_bytes(ann.index_to_bytes(index).tobytes())
    assert again.ntotal == 100 and again.hnsw.efSearch == index.hnsw.efSearch


# ----------------------------------------------------------------------------- the stage
def _put_embeddings(cfg, storage, x: np.ndarray) -> list[str]:
    from deepcontent.warehouse import Warehouse

    ids = [f"TR{i:06d}" for i in range(len(x))]
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = pa.table({"track_id": ids, "model_version": [VERSION] * len(ids), "predicted_factors": vector_column(x),
                     "embedding": vector_column(x), "audio_sha256": [f"h{i}" for i in range(len(ids))],
                     "computed_at": pa.array([now] * len(ids), pa.timestamp("us", tz="UTC"))})
    with Warehouse.from_config(cfg.warehouse, storage) as wh:
        wh.ensure_tables(["embeddings"])
        wh.upsert("embeddings", rows, run_id="seed-embeddings")
    return ids


def _similar(cfg, storage):
    from deepcontent.warehouse import Warehouse

    with Warehouse.from_config(cfg.warehouse, storage) as wh:
        return wh.read("similar_tracks").sort_by([("track_id", "ascending"), ("rank", "ascending")]), \
            wh.snapshot_count("similar_tracks")


def test_stage_is_exact_below_the_threshold(file_storage, tmp_path):
    x = clustered(600)
    cfg = config_for(file_storage, tmp_path, **{"embed.model_version": VERSION, "neighbors.k": 5,
                                                "neighbors.exact_max_tracks": 600})
    ids = _put_embeddings(cfg, file_storage, x)
    result = run_stage("neighbors", cfg, file_storage)
    got, snaps = _similar(cfg, file_storage)
    idx, score = top_k_cosine(x, k=5)
    assert got["track_id"].to_pylist() == [t for t in ids for _ in range(5)]
    assert got["neighbor_track_id"].to_pylist() == [ids[j] for j in idx.ravel()]
    np.testing.assert_allclose(got["score"].to_numpy(), np.round(score.ravel(), 6), atol=1e-6)
    manifest = file_storage.read_json(result.manifest_uri)
    assert manifest["index"]["method"] == "exact" and "index" not in result.outputs
    # nothing new: nothing searched, nothing committed
    again = run_stage("neighbors", cfg, file_storage)
    assert not again.published and _similar(cfg, file_storage)[1] == snaps


def test_stage_uses_an_index_above_the_threshold_and_exports_it(file_storage, tmp_path):
    x = clustered(1500)
    cfg = config_for(file_storage, tmp_path, **{"embed.model_version": VERSION, "neighbors.k": 5,
                                                "neighbors.exact_max_tracks": 1000, "neighbors.recall_queries": 300})
    ids = _put_embeddings(cfg, file_storage, x)
    result = run_stage("neighbors", cfg, file_storage)
    report = file_storage.read_json(result.manifest_uri)["index"]
    assert report["method"] == "hnsw" and report["recall_queries"] == 300 and report["recall_at_k"] >= 0.95
    got, _ = _similar(cfg, file_storage)
    exact, _ = top_k_cosine(x, k=5)
    found = np.array([[ids.index(t) for t in got["neighbor_track_id"].to_pylist()[i * 5:(i + 1) * 5]] for i in range(len(ids))])
    assert ann.recall_at_k(found, exact) >= 0.95
    # the exported index loads and answers like the table
    pointer = file_storage.published(result.outputs["index"])
    assert pointer["method"] == "hnsw" and pointer["recall_at_k"] == report["recall_at_k"] and pointer["tracks"] == 1500
    files = file_storage.published_files(result.outputs["index"])
    index = ann.index_from_bytes(file_storage.read_bytes(next(f for f in files if f.endswith("index.faiss"))))
    row_ids = file_storage.read_parquet(next(f for f in files if f.endswith("ids.parquet")))["track_id"].to_pylist()
    assert row_ids == ids and index.ntotal == 1500
    mine, _ = ann.search_index(index, ann.unit_rows(x), np.array([7]), k=5)
    assert [ids[j] for j in mine[0]] == got["neighbor_track_id"].to_pylist()[35:40]


def test_stage_fails_below_min_recall_and_commits_nothing(file_storage, tmp_path):
    from deepcontent.stages.neighbors import NeighborsRecallError

    x = np.random.default_rng(0).normal(size=(1200, 32)).astype(np.float32)  # no structure: hard for a coarse IVF
    cfg = config_for(file_storage, tmp_path, **{"embed.model_version": VERSION, "neighbors.k": 10,
                                                "neighbors.exact_max_tracks": 100, "neighbors.index": "ivf",
                                                "neighbors.index_params": "{nlist: 64, nprobe: 1}",
                                                "neighbors.recall_queries": 200})
    _put_embeddings(cfg, file_storage, x)
    with pytest.raises(NeighborsRecallError, match=r"recall@10 = 0\.\d+ .* below neighbors.min_recall = 0.95"):
        run_stage("neighbors", cfg, file_storage)
    from deepcontent.warehouse import Warehouse

    with Warehouse.from_config(cfg.warehouse, file_storage) as wh:
        wh.ensure_tables(["similar_tracks"])
        assert wh.read("similar_tracks").num_rows == 0
    failed = [o for o in file_storage.list(file_storage.uri("runs", "neighbors")) if o.uri.endswith(".json")
              and "_completed" not in o.uri]
    manifest = file_storage.read_json(failed[0].uri)
    assert manifest["status"] == "failed" and manifest["index"]["recall_at_k"] < 0.95


def test_stage_raises_the_search_effort_until_the_recall_holds(file_storage, tmp_path):
    x = np.random.default_rng(1).normal(size=(1200, 32)).astype(np.float32)  # near-uniform: hard for IVF
    settings = {"embed.model_version": VERSION, "neighbors.k": 10, "neighbors.exact_max_tracks": 100,
                "neighbors.index": "ivf", "neighbors.index_params": "{nlist: 64, nprobe: 2}",
                "neighbors.recall_queries": 200}
    ids = _put_embeddings(config_for(file_storage, tmp_path, **settings), file_storage, x)
    from deepcontent.stages.neighbors import NeighborsRecallError

    # The configured effort alone is too little for these vectors ...
    with pytest.raises(NeighborsRecallError, match=r"nprobe raised as far as neighbors.max_search_effort = 1"):
        run_stage("neighbors", config_for(file_storage, tmp_path, **settings, **{"neighbors.max_search_effort": 1}),
                  file_storage)
    # ... raised on the sample (doubling, at most 32×) it reaches the gate, and the full search uses it.
    cfg = config_for(file_storage, tmp_path, **settings, **{"neighbors.max_search_effort": 32})
    result = run_stage("neighbors", cfg, file_storage)
    report = file_storage.read_json(result.manifest_uri)["index"]
    efforts = [t["nprobe"] for t in report["effort_tries"]]
    assert efforts[0] == 2 and efforts == sorted(efforts) and len(efforts) > 1
    assert all(t["recall_at_k"] < 0.95 for t in report["effort_tries"][:-1])
    assert report["params"]["nprobe"] == efforts[-1] and report["recall_at_k"] >= 0.95
    got, _ = _similar(cfg, file_storage)
    exact, _ = top_k_cosine(x, k=10)
    found = np.array([[ids.index(t) for t in got["neighbor_track_id"].to_pylist()[i * 10:(i + 1) * 10]]
                      for i in range(len(ids))])
    assert ann.recall_at_k(found, exact) >= 0.95
    pointer = file_storage.published(result.outputs["index"])
    assert pointer["params"]["nprobe"] == efforts[-1]
