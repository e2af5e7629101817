"""Two upserters of the same new keys into one Iceberg table (SQLite catalog), in parallel.

Each round both write the same 120 new keys at once, each through its own catalog connection
(as two processes would). Afterwards every key has exactly one row, and every call either
committed or found nothing left to change.
"""

from __future__ import annotations

import datetime as dt
import threading

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from deepcontent.config import WarehouseConfig
from deepcontent.warehouse import Warehouse

NOW = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)


def _rows(keys: list[str], version: str) -> pa.Table:
    n = len(keys)
    return pa.table({
        "track_id": keys, "model_version": [version] * n,
        "predicted_factors": pa.array([[1.0, 2.0]] * n, pa.list_(pa.float32())),
        "embedding": pa.array([[0.5, 0.5]] * n, pa.list_(pa.float64())),
        "audio_sha256": [f"sha-{k}" for k in keys],
        "computed_at": pa.array([NOW] * n, pa.timestamp("us", tz="UTC")),
    })


def _contend(storage, tmp_path, rounds: int) -> None:
    cfg = WarehouseConfig(uri=f"sqlite:///{tmp_path}/catalog/catalog.db")
    with Warehouse.from_config(cfg, storage) as wh:
        wh.ensure_tables(["embeddings"])
    writers = [Warehouse.from_config(cfg, storage) for _ in range(2)]
    try:
        for rnd in range(rounds):
            keys = [f"T{rnd:04d}-{i:03d}" for i in range(120)]
            barrier = threading.Barrier(2)
            results: list[object] = []

            def upsert(wh: Warehouse, w: int) -> None:
                barrier.wait()
                try:
                    results.append(wh.upsert("embeddings", _rows(keys, "v1"), run_id=f"r{rnd}-w{w}"))
                except Exception as exc:  # noqa: BLE001 - the assertion below reports it
                    results.append(exc)

            threads = [threading.Thread(target=upsert, args=(wh, w)) for w, wh in enumerate(writers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert sorted(map(repr, results)) == ["False", "True"], f"round {rnd}: {results}"
        stored = writers[0].read("embeddings", columns=["track_id"])
        counts = stored.group_by("track_id").aggregate([([], "count_all")])
        dups = counts.filter(pc.greater(counts["count_all"], 1))
        assert dups.num_rows == 0, f"{dups.num_rows} keys have two rows, e.g. {dups.slice(0, 3).to_pylist()}"
        assert stored.num_rows == 120 * rounds
    finally:
        for wh in writers:
            wh.close()


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_two_upserters_of_the_same_new_keys(request, tmp_path, backend):
    _contend(request.getfixturevalue(f"{backend}_storage"), tmp_path, rounds=6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_two_upserters_of_the_same_new_keys_200_rounds(request, tmp_path, backend):
    _contend(request.getfixturevalue(f"{backend}_storage"), tmp_path, rounds=200)
