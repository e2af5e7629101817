"""Merge-on-read upserts on partitioned tables, and their maintenance.

What must hold: an upsert reads only the key and change columns of the partitions its keys fall
in, replaces a changed row by a position delete plus a new row (the other rows' files are left
as they are), and every reader sees exactly one row per key; ``maintain`` folds the deletes
back into clean files and expires old snapshots without changing a row.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepcontent import table_merge
from deepcontent.config import WarehouseConfig
from deepcontent.datasets import vector_column
from deepcontent.errors import WarehouseError
from deepcontent.storage import Storage
from deepcontent.warehouse import Warehouse

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
def warehouse(tmp_path):
    storage = Storage(f"file://{tmp_path}/root")
    storage.ensure_root()
    wh = Warehouse.from_config(WarehouseConfig(uri=f"sqlite:///{tmp_path}/catalog.db"), storage)
    wh.ensure_tables(["embeddings", "similar_tracks", "tracks"])
    try:
        yield wh
    finally:
        wh.close()


def emb(ids, *, version="v1", audio="a", dim=8, value=0.0) -> pa.Table:
    x = np.full((len(ids), dim), value, np.float32) + np.arange(len(ids), dtype=np.float32)[:, None]
    return pa.table({"track_id": list(ids), "model_version": [version] * len(ids), "predicted_factors": vector_column(x),
                     "embedding": vector_column(x), "audio_sha256": [f"{audio}-{t}" for t in ids],
                     "computed_at": pa.array([NOW] * len(ids), pa.timestamp("us", tz="UTC"))})


def rows_by_key(t: pa.Table) -> dict:
    keys = list(zip(t["track_id"].to_pylist(), t["model_version"].to_pylist()))
    assert len(keys) == len(set(keys)), "a key appears twice"
    return dict(zip(keys, t["audio_sha256"].to_pylist()))


def test_tables_are_partitioned_by_version_and_track_bucket(warehouse):
    spec = warehouse.table("embeddings").spec()
    assert [(f.name, str(f.transform)) for f in spec.fields] == [("model_version", "identity"),
                                                                  ("track_id_bucket", "bucket[16]")]
    assert not warehouse.table("similar_tracks").spec().is_unpartitioned()
    assert warehouse.table("tracks").spec().is_unpartitioned()


def test_a_change_is_a_position_delete_and_a_new_row(warehouse):
    ids = [f"T{i:04d}" for i in range(400)]
    assert warehouse.upsert("embeddings", emb(ids), run_id="load")
    files_before = {t.file.file_path for t in warehouse.table("embeddings").scan().plan_files()}
    changed = ids[::50]  # 8 tracks whose audio changed, and 3 new ones
    assert warehouse.upsert("embeddings", pa.concat_tables([emb(changed, audio="b"), emb(["N1", "N2", "N3"])]),
                            run_id="night")
    tbl = warehouse.table("embeddings")
    tasks = list(tbl.scan().plan_files())
    # the old files stay; their changed rows are deleted by position
    assert files_before <= {t.file.file_path for t in tasks}
    deletes = {d.file_path for t in tasks for d in t.delete_files}
    assert deletes and all("deletes" in d for d in deletes)
    summary = tbl.current_snapshot().summary
    assert int(summary["added-position-deletes"]) == len(changed)
    got = rows_by_key(warehouse.read("embeddings"))
    assert len(got) == 403
    assert all(got[(t, "v1")] == f"b-{t}" for t in changed) and got[("T0001", "v1")] == "a-T0001"
    # the same again: nothing changes, no snapshot
    n = warehouse.snapshot_count("embeddings")
    assert not warehouse.upsert("embeddings", emb(changed, audio="b"), run_id="again")
    assert warehouse.snapshot_count("embeddings") == n


def test_upsert_reads_only_key_and_change_columns_of_touched_partitions(warehouse, monkeypatch):
    ids = [f"T{i:04d}" for i in range(300)]
    warehouse.upsert("embeddings", emb(ids, version="v1"), run_id="v1")
    warehouse.upsert("embeddings", emb(ids, version="v2"), run_id="v2")
    reads = []
    real = pq.read_table

    def spy(source, *args, **kwargs):
        reads.append((getattr(source, "path", None) or str(source), tuple(kwargs.get("columns") or ())))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(table_merge.pq, "read_table", spy)
    v2_files = {t.file.file_path for t in warehouse.table("embeddings").scan().plan_files()
                if t.file.partition[0] == "v2"}
    assert warehouse.upsert("embeddings", emb(ids[:5], version="v2", audio="c"), run_id="c")
    data_reads = [r for r in reads if "deletes" not in r[0]]
    assert data_reads and all(cols == ("track_id", "model_version", "audio_sha256") for _, cols in data_reads)
    touched = table_merge.partition_values(warehouse.table("embeddings"), emb(ids[:5], version="v2"))
    assert len(data_reads) <= len(touched) < len(v2_files) + 1  # only the buckets of those 5 tracks, only v2
    assert rows_by_key(warehouse.read("embeddings"))[("T0000", "v1")] == "a-T0000"


def test_upsert_of_parts_equals_upsert_of_the_whole(warehouse):
    ids = [f"T{i:04d}" for i in range(120)]
    calls = []

    def parts():
        calls.append(1)
        for s in range(0, 120, 25):
            yield emb(ids[s:s + 25])

    assert warehouse.upsert("embeddings", parts, run_id="parts")
    assert len(calls) == 2  # planned from the keys, then written, one part at a time
    assert rows_by_key(warehouse.read("embeddings")) == rows_by_key(emb(ids))
    assert not warehouse.upsert("embeddings", list(parts()), run_id="again")


def test_an_upsert_given_the_heads_reads_each_part_once_and_checks_they_match(warehouse):
    warehouse.upsert("embeddings", emb(["a", "b"]), run_id="r1")
    parts, calls = [emb(["b", "c"], audio="x"), emb(["d"])], []

    def data():
        calls.append(1)
        return parts

    heads = pa.concat_tables([p.select(["track_id", "model_version", "audio_sha256"]) for p in parts])
    assert warehouse.upsert("embeddings", data, run_id="r2", heads=heads)
    assert len(calls) == 1  # written only: the plan came from the heads
    assert rows_by_key(warehouse.read("embeddings")) == {("a", "v1"): "a-a", ("b", "v1"): "x-b", ("c", "v1"): "x-c",
                                                          ("d", "v1"): "a-d"}
    snapshot = warehouse.snapshot_id("embeddings")
    with pytest.raises(WarehouseError, match="plan was made from 2 rows, the parts hold more"):
        warehouse.upsert("embeddings", [emb(["e", "f", "g"])], run_id="r3",
                         heads=emb(["e", "f"]).select(["track_id", "model_version", "audio_sha256"]))
    with pytest.raises(WarehouseError, match="plan was made from 2 rows, the parts hold 1"):
        warehouse.upsert("embeddings", [emb(["e"])], run_id="r4",
                         heads=emb(["e", "f"]).select(["track_id", "model_version", "audio_sha256"]))
    with pytest.raises(WarehouseError, match="rows 0-1 of the parts are not the heads"):
        warehouse.upsert("embeddings", [emb(["e", "g"])], run_id="r5",
                         heads=emb(["e", "f"]).select(["track_id", "model_version", "audio_sha256"]))
    assert warehouse.snapshot_id("embeddings") == snapshot  # none of them committed anything


def test_a_file_whose_rows_all_change_is_dropped_not_masked(warehouse):
    warehouse.upsert("tracks", pa.table({"track_id": ["a", "b"], "song_id": ["s", "s"], "title": ["x", "y"]}), run_id="t1")
    assert warehouse.upsert("tracks", pa.table({"track_id": ["a", "b"], "song_id": ["s", "s"], "title": ["x2", "y2"]}),
                            run_id="t2")
    tasks = list(warehouse.table("tracks").scan().plan_files())
    assert len(tasks) == 1 and not tasks[0].delete_files
    assert sorted(warehouse.read("tracks", columns=["title"])["title"].to_pylist()) == ["x2", "y2"]


def test_maintain_compacts_deletes_and_expires_snapshots(warehouse):
    ids = [f"T{i:04d}" for i in range(500)]
    warehouse.upsert("embeddings", emb(ids), run_id="load")
    for night in range(3):
        warehouse.upsert("embeddings", emb(ids[night::40], audio=f"n{night}"), run_id=f"night{night}")
    before = warehouse.read("embeddings").sort_by("track_id")
    assert any(t.delete_files for t in warehouse.table("embeddings").scan().plan_files())
    out = warehouse.maintain("embeddings", run_id="m1", older_than_s=0, retain_last=1, min_files=4,
                             min_deleted_fraction=0)
    assert out["partitions"] > 0 and out["delete_files_removed"] > 0 and out["snapshots_expired"] >= 4
    tasks = list(warehouse.table("embeddings").scan().plan_files())
    assert not any(t.delete_files for t in tasks)
    assert warehouse.snapshot_count("embeddings") == 1
    after = warehouse.read("embeddings").sort_by("track_id")
    assert after.equals(before)
    # nothing left to do: no new snapshot
    again = warehouse.maintain("embeddings", run_id="m2", older_than_s=0, retain_last=1, min_files=4,
                             min_deleted_fraction=0)
    assert again["partitions"] == 0 and warehouse.snapshot_count("embeddings") == 1


def test_plan_merge_is_pure():
    incoming = pa.table({"k": ["a", "b", "c"], "v": [1, 2, 3]})
    stored = pa.table({"k": ["a", "b", "b", "z"], "v": [1, 9, 2, 0], "__file": pa.array([0, 0, 1, 1], pa.int32()),
                       "__pos": pa.array([0, 1, 0, 1], pa.int64())})
    plan = table_merge.plan_merge(incoming, stored, keys=["k"], compare=["v"])
    assert plan.write.tolist() == [False, True, True]  # a same; b stored twice -> changed; c new
    assert sorted(zip(plan.delete_file.tolist(), plan.delete_pos.tolist())) == [(0, 1), (1, 0)]
    assert (plan.n_new, plan.n_changed) == (1, 1)


def test_maintain_stage_compacts_once_and_its_manifest_names_the_snapshot(tmp_path):
    from support import config_for, run_stage

    storage = Storage(f"file://{tmp_path}/store")
    storage.ensure_root()
    cfg = config_for(storage, tmp_path, **{"maintain.older_than_hours": 0, "maintain.retain_last": 1})
    ids = [f"T{i:04d}" for i in range(300)]
    with Warehouse.from_config(cfg.warehouse, storage) as wh:
        wh.ensure_tables(["embeddings"])
        wh.upsert("embeddings", emb(ids), run_id="load")
        wh.upsert("embeddings", emb(ids[:120], audio="b"), run_id="night")  # 40% of the rows deleted
    result = run_stage("maintain", cfg, storage)
    assert result.published and result.counts["partitions"] > 0 and result.counts["snapshots_expired"] >= 1
    manifest = storage.read_json(result.manifest_uri)
    with Warehouse.from_config(cfg.warehouse, storage) as wh:
        snap = manifest["snapshots"]["embeddings"]
        assert snap["snapshot_id"] == wh.snapshot_id("embeddings")
        # the metadata file of the compaction commit (expiry then wrote a newer one)
        assert snap["metadata_location"].endswith(".metadata.json") and storage.exists(snap["metadata_location"])
        assert not any(t.delete_files for t in wh.table("embeddings").scan().plan_files())
        assert len(rows_by_key(wh.read("embeddings"))) == 300
    again = run_stage("maintain", cfg, storage)
    assert not again.published and again.manifest_uri is None
