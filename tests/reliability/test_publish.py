"""Publishing under concurrency: N publishers and M readers on one dataset, against a filesystem
and the embedded S3 server (which ignores conditional writes, so the lease lock is exercised).

Every round: each writer stages a part, waits at a barrier with the readers, then publishes on
top of the generation it read. Afterwards: every writer either committed or got
PublishConflict, exactly one writer per round committed, every read returned one whole
version, and the pointer never names a missing file.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pytest

from deepcontent.errors import PublishConflict, StorageError
from deepcontent.storage import Storage, join


def _fresh(storage: Storage) -> Storage:
    """Another process's view of the same store (own clients, own lock file handles)."""
    return storage.with_root(storage.root)


def _rounds(storage: Storage, *, writers: int, readers: int, rounds: int) -> dict:
    ds = storage.uri("canonical/contended")
    storage.lock_settle_s = 0.05
    outcomes: list[tuple[int, str]] = []
    reads: list[tuple[int, object]] = []
    lock = threading.Lock()

    def writer(rnd: int, w: int, barrier: threading.Barrier) -> None:
        st = _fresh(storage)
        st.lock_settle_s = storage.lock_settle_s
        gen = st.generation(ds)
        part = join(st.staging_uri(ds, f"r{rnd}-w{w}"), "part-0.parquet")
        st.write_parquet(pa.table({"writer": [f"r{rnd}-w{w}"] * 3, "i": [0, 1, 2]}), part)
        barrier.wait()
        try:
            st.publish(ds, run_id=f"r{rnd}-w{w}", files=[part], expected_generation=gen, keep_versions=2)
            result = "committed"
        except PublishConflict:
            result = "conflict"
        with lock:
            outcomes.append((rnd, result))

    def reader(rnd: int, barrier: threading.Barrier) -> None:
        st = _fresh(storage)
        barrier.wait()
        try:
            table = st.read_dataset(ds) if st.published(ds) else None
            got = None if table is None else (sorted(set(table["writer"].to_pylist())), table.num_rows)
        except StorageError as exc:  # a failed read is what this test exists to catch
            got = exc
        with lock:
            reads.append((rnd, got))

    for rnd in range(rounds):
        barrier = threading.Barrier(writers + readers)
        threads = [threading.Thread(target=writer, args=(rnd, w, barrier)) for w in range(writers)]
        threads += [threading.Thread(target=reader, args=(rnd, barrier)) for _ in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        pointer = storage.published(ds)
        missing = [f for f in storage.published_files(ds) if not storage.exists(f)]
        assert not missing, f"round {rnd}: pointer generation {pointer['generation']} names missing files {missing}"
    return {"ds": ds, "outcomes": outcomes, "reads": reads}


def _check(storage: Storage, result: dict, *, writers: int, rounds: int) -> None:
    outcomes, reads = result["outcomes"], result["reads"]
    assert len(outcomes) == writers * rounds and {o for _, o in outcomes} <= {"committed", "conflict"}
    per_round = {r: sum(1 for rr, o in outcomes if rr == r and o == "committed") for r in range(rounds)}
    assert set(per_round.values()) == {1}, f"rounds without exactly one winner: {per_round}"
    bad = [(r, g) for r, g in reads if isinstance(g, Exception) or (g is not None and (len(g[0]) != 1 or g[1] != 3))]
    assert not bad, f"reads that failed or mixed versions: {bad[:3]}"
    pointer = storage.published(result["ds"])
    assert pointer["generation"] == rounds  # one generation per round, none lost, none doubled
    assert storage.read_dataset(result["ds"]).num_rows == 3


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_publishers_and_readers_contend(request, backend):
    storage = request.getfixturevalue(f"{backend}_storage")
    result = _rounds(storage, writers=3, readers=2, rounds=12)
    _check(storage, result, writers=3, rounds=12)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_publishers_and_readers_contend_200_rounds(request, backend):
    storage = request.getfixturevalue(f"{backend}_storage")
    result = _rounds(storage, writers=3, readers=2, rounds=200)
    _check(storage, result, writers=3, rounds=200)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_blind_publishers_all_land_in_generation_order(request, backend):
    """Without an expected generation every publish lands, each with its own generation."""
    storage = request.getfixturevalue(f"{backend}_storage")
    storage.lock_settle_s = 0.05
    ds = storage.uri("canonical/blind")
    parts = []
    for w in range(4):
        part = join(storage.staging_uri(ds, f"w{w}"), "part.parquet")
        storage.write_parquet(pa.table({"w": [w]}), part)
        parts.append(part)
    threads = [threading.Thread(target=lambda w=w: _fresh(storage).publish(ds, run_id=f"w{w}", files=[parts[w]]))
               for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert storage.generation(ds) == 4
    names = sorted(o.uri.rsplit("/", 1)[1] for o in storage.list(join(ds, "_history")))
    assert [n[:12] for n in names] == ["000000000003", "000000000004"]  # keep_versions=2, by generation


def test_a_publisher_whose_clock_is_an_hour_behind_keeps_its_version(file_storage, monkeypatch):
    st = file_storage
    ds = st.uri("canonical/skewed")
    for i in range(2):
        part = join(st.staging_uri(ds, f"on-time-{i}"), "part.parquet")
        st.write_parquet(pa.table({"x": [i]}), part)
        st.publish(ds, run_id=f"on-time-{i}", files=[part])
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() - 3600)
    part = join(st.staging_uri(ds, "late-clock"), "part.parquet")
    st.write_parquet(pa.table({"x": [99]}), part)
    st.publish(ds, run_id="late-clock", files=[part])
    assert st.published(ds)["run_id"] == "late-clock"
    assert st.read_dataset(ds)["x"].to_pylist() == [99]


def test_a_temp_file_in_history_does_not_break_the_sweep(any_storage):
    st = any_storage
    ds = st.uri("canonical/tmp-history")
    st.write_bytes(join(ds, "_history", "999999999999999-x.json.tmp-1a2b3c4d"), b"{half a pointer")
    st.write_bytes(join(ds, "_history", "notes.txt"), b"not ours")
    part = join(st.staging_uri(ds, "run-1"), "part.parquet")
    st.write_parquet(pa.table({"x": [1]}), part)
    st.publish(ds, run_id="run-1", files=[part])
    assert st.read_dataset(ds)["x"].to_pylist() == [1]


def test_the_sweep_spares_another_runs_staged_parts(any_storage):
    """A run in flight has staged parts but not published: a concurrent publish must not delete
    them (they are younger than the grace period)."""
    st = any_storage
    ds = st.uri("canonical/inflight")
    in_flight = join(st.staging_uri(ds, "slow-run"), "part-0.parquet")
    st.write_parquet(pa.table({"x": [7]}), in_flight)
    for i in range(3):
        part = join(st.staging_uri(ds, f"fast-{i}"), "part.parquet")
        st.write_parquet(pa.table({"x": [i]}), part)
        st.publish(ds, run_id=f"fast-{i}", files=[part])
    assert st.exists(in_flight)
    st.publish(ds, run_id="slow-run", files=[in_flight])
    assert st.read_dataset(ds)["x"].to_pylist() == [7]


def test_a_stale_expected_generation_is_a_conflict_and_writes_nothing(any_storage):
    st = any_storage
    ds = st.uri("canonical/stale")
    a = join(st.staging_uri(ds, "a"), "p.parquet")
    b = join(st.staging_uri(ds, "b"), "p.parquet")
    st.write_parquet(pa.table({"x": [1]}), a)
    st.write_parquet(pa.table({"x": [2]}), b)
    st.publish(ds, run_id="a", files=[a], expected_generation=0)
    with pytest.raises(PublishConflict, match="generation 1.*generation 0"):
        st.publish(ds, run_id="b", files=[b], expected_generation=0)
    assert st.published(ds)["run_id"] == "a" and st.exists(b)
