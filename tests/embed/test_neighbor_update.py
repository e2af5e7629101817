"""Nightly neighbours by updating the last index (deepcontent.embed.neighbor_update) and the stage
that uses it: only the lists that can change are searched again, and the result keeps the recall
a full search has."""

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from deepcontent.datasets import vector_column
from deepcontent.embed import ann
from deepcontent.embed import neighbor_update as nu
from deepcontent.embed.similarity import top_k_cosine
from support import config_for, run_stage

VERSION = "test-model-v1"


def clustered(n: int, d: int = 16, *, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(n // 50, 4), d))
    return (centres[rng.integers(0, len(centres), n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def test_the_plan_tells_unchanged_changed_new_and_gone_tracks_apart():
    rows = pa.array(["a", "b", "c", "d", "b"])           # row 1 is b's old vector, already dead
    alive = np.array([True, False, True, True, True])
    row_hashes = np.array([1, 2, 3, 4, 5], np.uint64)
    now = pa.array(["a", "b", "c", "e"])                   # d gone, e new, c changed
    plan = nu.plan_update(row_track_ids=rows, row_alive=alive, row_hashes=row_hashes, track_ids=now,
                          hashes=np.array([1, 5, 30, 6], np.uint64))
    assert plan.row_of_pos.tolist() == [0, 4, -1, -1]
    assert plan.changed_pos.tolist() == [2] and plan.add_pos.tolist() == [2, 3]
    assert plan.gone_rows.tolist() == [3] and plan.dead_rows.tolist() == [1, 2, 3] and plan.churn == 3


def test_affected_are_the_added_those_listing_a_stale_track_and_those_an_added_vector_outranks():
    prev = np.array([[1, 2], [0, 2], [0, 1], [-2, 0], [0, 1]])   # track 3 lists a gone track
    scores = np.array([[.9, .8], [.9, .7], [.8, .7], [.9, .5], [.6, .4]], np.float32)
    plan = nu.UpdatePlan(row_of_pos=np.array([0, 1, 2, 3, 4, -1]), add_pos=np.array([5]), changed_pos=np.array([], np.int64),
                         gone_rows=np.array([9]), dead_rows=np.array([9]))
    prev6 = np.vstack([prev, [[-1, -1]]])
    scores6 = np.vstack([scores, [[-np.inf, -np.inf]]]).astype(np.float32)
    # the new track 5 is closest to 4 (0.5 > its k-th 0.4) and to 0 (0.3 < 0.8: 0 keeps its list)
    got = nu.affected_positions(prev_neighbors=prev6, prev_scores=scores6, plan=plan,
                                reverse_neighbors=np.array([[4, 0]]), reverse_scores=np.array([[.5, .3]], np.float32))
    assert [g.tolist() for g in got] == [[3, 5], [4]]  # 3 and 5 searched again; 4 gains 5
    # a changed track 2 makes every list holding it stale
    plan2 = nu.UpdatePlan(row_of_pos=np.array([0, 1, -1, 3, 4]), add_pos=np.array([2]), changed_pos=np.array([2]),
                          gone_rows=np.array([], np.int64), dead_rows=np.array([2]))
    got2 = nu.affected_positions(prev_neighbors=prev, prev_scores=scores, plan=plan2,
                                 reverse_neighbors=np.zeros((1, 0), np.int64), reverse_scores=np.zeros((1, 0), np.float32))
    assert got2[0].tolist() == [0, 1, 2, 3] and got2[1].tolist() == []  # 4 lists neither 2 nor a gone track


def test_an_update_matches_a_full_search_and_leaves_unaffected_lists_alone():
    n, k = 4000, 10
    x = clustered(n, seed=3)
    unit = ann.unit_rows(x)
    params = ann.default_params("hnsw", n=n, k=k)
    index = ann.build_index(unit, spec=ann.IndexSpec("hnsw", params))
    idx, score = ann.search_index(index, unit, slice(None), k=k)
    ids = pa.array([f"T{i:05d}" for i in range(n)])
    published = pa.table({"track_id": pa.array(np.repeat(ids.to_numpy(zero_copy_only=False), k)),
                          "neighbor_track_id": ids.take(pa.array(idx.ravel())),
                          "rank": pa.array(np.tile(np.arange(1, k + 1), n), pa.int32()),
                          "score": pa.array(score.ravel())})
    # a nightly: 40 tracks get new vectors, 40 new tracks, 20 tracks leave
    rng = np.random.default_rng(7)
    changed = rng.choice(n, 40, replace=False)
    x2 = x.copy()
    x2[changed] = clustered(40, seed=11)
    keep = np.setdiff1d(np.arange(n), rng.choice(np.setdiff1d(np.arange(n), changed), 20, replace=False))
    x_now = np.vstack([x2[keep], clustered(40, seed=12)])
    ids_now = pa.concat_arrays([ids.take(pa.array(keep)), pa.array([f"U{i:05d}" for i in range(40)])])
    unit_now = ann.unit_rows(x_now)
    plan = nu.plan_update(row_track_ids=ids, row_alive=np.ones(n, bool), row_hashes=ann.row_hashes(unit),
                          track_ids=ids_now, hashes=ann.row_hashes(unit_now))
    assert (len(plan.changed_pos), len(plan.add_pos), len(plan.gone_rows)) == (40, 80, 20)
    prev_idx, prev_score = nu.previous_lists(published, ids_now, k=k)
    got, got_score, affected, pos_of_row, searched = nu.update_neighbors(
        index, unit=unit_now, plan=plan, prev_neighbors=prev_idx, prev_scores=prev_score, k=k, reverse_candidates=100)
    truth, _ = top_k_cosine(unit_now, k=k)
    assert ann.recall_at_k(got, truth) >= 0.95
    assert searched < len(affected) < len(ids_now) // 4  # a small change touches few lists, searches fewer
    untouched = np.setdiff1d(np.arange(len(ids_now)), affected)
    assert (got[untouched] == prev_idx[untouched]).all()
    # nothing dead or stale is listed, nobody lists itself, and scores are the cosines listed
    assert (got >= 0).all() and not (got == np.arange(len(ids_now))[:, None]).any()
    np.testing.assert_allclose(got_score[affected], np.einsum("ijk,ik->ij", unit_now[got[affected]], unit_now[affected]),
                               atol=1e-5)
    assert index.ntotal == n + 80 and (pos_of_row >= 0).sum() == len(ids_now)


def test_merged_entries_take_their_rank_by_score_ties_by_position():
    prev = np.array([[4, 2, -1], [0, 3, 2]])
    scores = np.array([[.9, .5, -np.inf], [.8, .6, .4]], np.float32)
    entries = (np.array([0, 1, 1, 7]), np.array([5, 6, 1, 9]), np.array([.7, .6, .9, .99], np.float32))
    got, got_scores = nu.merge_entries(prev_neighbors=prev, prev_scores=scores, owners=np.array([0, 1]),
                                       entries=entries)
    assert got.tolist() == [[4, 5, 2], [1, 0, 3]]  # owner 1: 6 ties 3 at 0.6 and loses (larger position)
    np.testing.assert_allclose(got_scores, [[.9, .7, .5], [.9, .8, .6]])


# ----------------------------------------------------------------------------- the stage
def _put(cfg, storage, ids: list[str], x: np.ndarray, shas: list[str]) -> None:
    from deepcontent.warehouse import Warehouse

    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = pa.table({"track_id": ids, "model_version": [VERSION] * len(ids), "predicted_factors": vector_column(x),
                     "embedding": vector_column(x), "audio_sha256": shas,
                     "computed_at": pa.array([now] * len(ids), pa.timestamp("us", tz="UTC"))})
    with Warehouse.from_config(cfg.warehouse, storage) as wh:
        wh.ensure_tables(["embeddings"])
        wh.upsert("embeddings", rows, run_id=f"embeddings-{shas[0]}")


def _lists(cfg, storage) -> tuple[dict, int]:
    from deepcontent.warehouse import Warehouse

    with Warehouse.from_config(cfg.warehouse, storage) as wh:
        t = wh.read("similar_tracks").sort_by([("track_id", "ascending"), ("rank", "ascending")])
        snaps = wh.snapshot_count("similar_tracks")
    out: dict[str, list[str]] = {}
    for a, b in zip(t["track_id"].to_pylist(), t["neighbor_track_id"].to_pylist()):
        out.setdefault(a, []).append(b)
    return out, snaps


def test_a_nightly_updates_the_last_index_and_commits_only_the_lists_that_change(file_storage, tmp_path):
    n, k = 2000, 5
    settings = {"embed.model_version": VERSION, "neighbors.k": k, "neighbors.exact_max_tracks": 500,
                "neighbors.recall_queries": 300}
    cfg = config_for(file_storage, tmp_path, **settings)
    x = clustered(n, seed=5)
    ids = [f"TR{i:06d}" for i in range(n)]
    _put(cfg, file_storage, ids, x, [f"h{i}" for i in range(n)])
    first = run_stage("neighbors", cfg, file_storage)
    assert "incremental" not in file_storage.read_json(first.manifest_uri)["index"]
    before, _ = _lists(cfg, file_storage)

    # 10 tracks re-embedded with new audio, 10 new tracks
    changed = list(range(0, 1000, 100))
    x_changed = clustered(10, seed=21)
    x_new = clustered(10, seed=22)
    new_ids = [f"TS{i:06d}" for i in range(10)]
    _put(cfg, file_storage, [ids[i] for i in changed] + new_ids, np.vstack([x_changed, x_new]),
         [f"g{i}" for i in range(20)])
    second = run_stage("neighbors", cfg, file_storage)
    report = file_storage.read_json(second.manifest_uri)["index"]
    inc = report["incremental"]
    assert (inc["changed"], inc["new"], inc["removed"]) == (10, 10, 0)
    assert 20 <= inc["searched_again"] <= inc["lists_changed"] < n // 4 and inc["index_rows"] == n + 20 and inc["dead_rows"] == 10
    assert report["recall_at_k"] >= 0.95

    # the table now holds the lists of the new vectors: recall against exact search on them
    x_now = x.copy()
    x_now[changed] = x_changed
    all_ids = ids + new_ids
    unit_now = ann.unit_rows(np.vstack([x_now, x_new]))
    order = np.argsort(all_ids)  # the stage works in track-id order
    truth, _ = top_k_cosine(unit_now[order], k=k)
    sorted_ids = [all_ids[i] for i in order]
    after, _ = _lists(cfg, file_storage)
    found = np.array([[sorted_ids.index(t) for t in after[tid]] for tid in sorted_ids])
    assert ann.recall_at_k(found, truth) >= 0.95
    assert all(len(after[t]) == k for t in new_ids)
    # lists no change could reach are as they were
    same = sum(after[t] == before[t] for t in ids)
    assert same >= n - inc["lists_changed"]

    # the exported index marks the changed tracks' old rows dead; a serving system skips them
    files = file_storage.published_files(second.outputs["index"])
    rows = file_storage.read_parquet(next(f for f in files if f.endswith("ids.parquet")))
    assert rows.num_rows == n + 20 and rows["alive"].to_pylist().count(False) == 10
    dead = [t for t, a in zip(rows["track_id"].to_pylist(), rows["alive"].to_pylist()) if not a]
    assert sorted(dead) == sorted(ids[i] for i in changed)

    # nothing new: no search, no snapshot; too much churn: a full search
    _, snaps = _lists(cfg, file_storage)
    assert not run_stage("neighbors", cfg, file_storage).published and _lists(cfg, file_storage)[1] == snaps
    _put(cfg, file_storage, ids[1000:1600], clustered(600, seed=30), [f"f{i}" for i in range(600)])
    third = run_stage("neighbors", config_for(file_storage, tmp_path, **settings), file_storage)
    assert "incremental" not in file_storage.read_json(third.manifest_uri)["index"]
    rows = file_storage.read_parquet(next(f for f in file_storage.published_files(third.outputs["index"])
                                          if f.endswith("ids.parquet")))
    assert rows.num_rows == n + 10 and all(rows["alive"].to_pylist())


def _recall_of_table(cfg, storage, ids: list[str], x: np.ndarray, k: int) -> float:
    lists, _ = _lists(cfg, storage)
    order = np.argsort(ids)
    sorted_ids = [ids[i] for i in order]
    position = {t: i for i, t in enumerate(sorted_ids)}
    truth, _ = top_k_cosine(ann.unit_rows(x[order]), k=k)
    assert all(len(set(lists[t])) == len(lists[t]) == k for t in sorted_ids)  # k distinct neighbours each
    return ann.recall_at_k(np.array([[position[t] for t in lists[tid]] for tid in sorted_ids]), truth)


@pytest.mark.parametrize("new_tracks", [0, 10])
def test_a_nightly_killed_between_commit_and_export_is_repaired_by_the_next_run(file_storage, tmp_path, monkeypatch,
                                                                                new_tracks):
    """The lists are committed before the index is exported: a run dying in between leaves the
    table ahead of the index. The next run must still publish lists of the current vectors —
    by updating from the old index when the track sets agree, by rebuilding when they do not."""
    from deepcontent.stages import neighbors as stage

    n, k = 2000, 5
    cfg = config_for(file_storage, tmp_path, **{"embed.model_version": VERSION, "neighbors.k": k,
                                                "neighbors.exact_max_tracks": 500, "neighbors.recall_queries": 300})
    x = clustered(n, seed=8)
    ids = [f"TR{i:06d}" for i in range(n)]
    _put(cfg, file_storage, ids, x, [f"h{i}" for i in range(n)])
    run_stage("neighbors", cfg, file_storage)

    changed = list(range(5, 2000, 200))
    x_now = x.copy()
    x_now[changed] = clustered(len(changed), seed=31)
    new_ids = [f"TS{i:06d}" for i in range(new_tracks)]
    x_new = clustered(new_tracks, seed=32) if new_tracks else np.zeros((0, x.shape[1]), np.float32)
    _put(cfg, file_storage, [ids[i] for i in changed] + new_ids, np.vstack([x_now[changed], x_new]),
         [f"g{i}" for i in range(len(changed) + new_tracks)])

    def die(*args, **kwargs):
        raise RuntimeError("killed before the export")

    with monkeypatch.context() as m:
        m.setattr(stage, "_export_index", die)
        with pytest.raises(RuntimeError, match="killed before the export"):
            run_stage("neighbors", cfg, file_storage)
    again = run_stage("neighbors", cfg, file_storage)
    report = file_storage.read_json(again.manifest_uri)["index"]
    assert ("incremental" in report) == (new_tracks == 0)  # same tracks: updated; more tracks: rebuilt
    all_ids, all_x = ids + new_ids, np.vstack([x_now, x_new])
    assert _recall_of_table(cfg, file_storage, all_ids, all_x, k) >= 0.95
    rows = file_storage.read_parquet(next(f for f in file_storage.published_files(again.outputs["index"])
                                          if f.endswith("ids.parquet")))
    alive = [t for t, a in zip(rows["track_id"].to_pylist(), rows["alive"].to_pylist()) if a]
    assert sorted(alive) == sorted(all_ids)
