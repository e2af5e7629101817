"""Warehouse tables: contract schemas, idempotent appends, key-based upserts, secrets.

Every behaviour runs against ``file://`` storage and against a real S3 server
(``rclone serve s3`` on loopback), both with a SQLite SQL catalog in ``tmp_path``.
"""

from __future__ import annotations

import datetime as dt
import logging
import traceback
import uuid

import pyarrow as pa
import pytest

from deepcontent.config import WarehouseConfig
from deepcontent.engines.s3server import EmbeddedS3Server
from deepcontent.storage import Storage
from deepcontent.warehouse import (
    TABLE_KEYS,
    TABLE_NAMES,
    TABLE_SCHEMAS,
    Warehouse,
    WarehouseError,
    WarehouseSchemaError,
    arrow_schema,
    conform,
)

# The warehouse tables of docs/architecture.md, written out independently of the module:
# (column, Iceberg type, required). Spectrograms are Parquet shards, not a warehouse table.
FLOATS = "list<float>"
CONTRACT = {
    "tracks": [("track_id", "string", True), ("song_id", "string", True), ("artist", "string", False),
               ("title", "string", False), ("audio_uri", "string", False)],
    "plays": [("user_id", "string", True), ("song_id", "string", True), ("play_count", "int", True)],
    "tags": [("track_id", "string", True), ("tag", "string", True), ("weight", "int", True)],
    "quarantine": [("stage", "string", True), ("source", "string", True), ("reason", "string", True),
                   ("detail", "string", False), ("run_id", "string", True)],
    "user_index": [("user_id", "string", True), ("idx", "int", True)],
    "item_index": [("song_id", "string", True), ("idx", "int", True)],
    "tag_index": [("tag", "string", True), ("idx", "int", True)],
    "splits": [("song_id", "string", True), ("split", "string", True)],
    "item_factors": [("song_id", "string", True), ("factors", FLOATS, True), ("split", "string", True),
                     ("run_id", "string", True)],
    "user_factors": [("user_id", "string", True), ("factors", FLOATS, True), ("run_id", "string", True)],
    "embeddings": [("track_id", "string", True), ("model_version", "string", True),
                   ("predicted_factors", FLOATS, True), ("embedding", FLOATS, True),
                   ("audio_sha256", "string", True), ("computed_at", "timestamptz", True)],
    "similar_tracks": [("track_id", "string", True), ("neighbor_track_id", "string", True), ("rank", "int", True),
                       ("score", "float", True), ("model_version", "string", True)],
}
ARROW_OF = {
    "string": pa.large_string(),
    "int": pa.int32(),
    "float": pa.float32(),
    "binary": pa.large_binary(),
    "timestamptz": pa.timestamp("us", tz="UTC"),
    FLOATS: pa.large_list(pa.field("element", pa.float32(), nullable=False)),
}
NOW = dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=dt.timezone.utc)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    server = EmbeddedS3Server(tmp_path_factory.mktemp("s3data")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path):
    if request.param == "file":
        st = Storage(f"file://{tmp_path}/root")
    else:
        server = request.getfixturevalue("s3_server")
        st = Storage(f"s3://wh-{uuid.uuid4().hex[:10]}/root", endpoint_url=server.endpoint_url,
                     credentials=server.credentials)
    st.ensure_root()
    return st


@pytest.fixture
def warehouse(storage, tmp_path):
    cfg = WarehouseConfig(uri=f"sqlite:///{tmp_path}/catalog/catalog.db")
    wh = Warehouse.from_config(cfg, storage)
    wh.ensure_tables()
    try:
        yield wh
    finally:
        wh.close()


def embeddings(rows, audio="sha"):
    """rows: (track_id, model_version, predicted_factors, embedding) -> an embeddings table
    with plain (non-large) Arrow types, as a stage would build it; audio hash ``<audio>-<track>``."""
    return pa.table({
        "track_id": [r[0] for r in rows],
        "model_version": [r[1] for r in rows],
        "predicted_factors": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
        "embedding": pa.array([r[3] for r in rows], pa.list_(pa.float64())),
        "audio_sha256": [f"{audio}-{r[0]}" for r in rows],
        "computed_at": pa.array([NOW] * len(rows), pa.timestamp("us", tz="UTC")),
    })


def by_key(table: pa.Table, name: str) -> dict:
    keys = TABLE_KEYS[name]
    out = {}
    for row in table.to_pylist():
        key = tuple(row[k] for k in keys)
        assert key not in out, f"duplicate key {key} in {name}"
        out[key] = row
    return out


# --------------------------------------------------------------------------- schemas
def test_contract_schemas_and_keys():
    assert set(TABLE_SCHEMAS) == set(CONTRACT) == set(TABLE_KEYS) == set(TABLE_NAMES)
    for name, expected in CONTRACT.items():
        schema = TABLE_SCHEMAS[name]
        got = [(f.name, str(f.field_type), f.required) for f in schema.fields]
        assert got == expected, name
        ids = [f.field_id for f in schema.fields]
        assert ids == list(range(1, len(ids) + 1)), name
        key_cols = {schema.find_column_name(i) for i in schema.identifier_field_ids}
        assert key_cols == set(TABLE_KEYS[name]), name
        assert all(schema.find_field(k).required for k in TABLE_KEYS[name]), name
    assert TABLE_KEYS["embeddings"] == ("track_id", "model_version")
    assert TABLE_KEYS["similar_tracks"] == ("track_id", "model_version", "rank")
    assert TABLE_KEYS["tracks"] == ("track_id",)
    assert all("run_id" in TABLE_SCHEMAS[t].column_names for t in ("item_factors", "user_factors"))


def test_arrow_schema_agrees_with_iceberg_schema():
    for name, expected in CONTRACT.items():
        schema = arrow_schema(name)
        assert schema.names == [c for c, _, _ in expected], name
        for field, (_, ice_type, required) in zip(schema, expected):
            assert field.type == ARROW_OF[ice_type], (name, field.name, field.type)
            assert field.nullable is (not required), (name, field.name)
            if ice_type == FLOATS:
                assert field.type.value_field.nullable is False
        # and it is exactly what Iceberg itself hands out for the table's schema
        assert schema == TABLE_SCHEMAS[name].as_arrow().remove_metadata(), name


def test_conform_casts_plain_types_and_rejects_bad_columns():
    out = conform("plays", pa.table({"user_id": ["u"], "song_id": ["s"], "play_count": pa.array([3], pa.int64())}))
    assert out.schema == arrow_schema("plays")
    # a missing optional column is filled with nulls, columns come back in contract order
    out = conform("tracks", pa.table({"song_id": ["S1"], "track_id": ["T1"]}))
    assert out.column_names == arrow_schema("tracks").names and out.column("title").null_count == 1

    cases = [
        ("plays", {"user_id": ["u"], "song_id": ["s"], "play_count": ["3"]}, "play_count"),  # string -> int
        ("plays", {"user_id": ["u"], "song_id": ["s"], "play_count": [2**40]}, "play_count"),  # overflow
        ("plays", {"user_id": ["u"], "song_id": ["s"], "play_count": [1.5]}, "play_count"),  # float -> int
        ("plays", {"user_id": ["u"], "song_id": [None], "play_count": [1]}, "song_id"),  # null in required
        ("plays", {"user_id": ["u"], "play_count": [1]}, "song_id"),  # required column missing
        ("plays", {"user_id": ["u"], "song_id": ["s"], "play_count": [1], "plays": [1]}, "plays"),  # unknown
        ("tracks", {"track_id": [1], "song_id": ["S"]}, "track_id"),  # int -> string
        ("item_factors", {"song_id": ["s"], "factors": [[1.0, None]], "split": ["train"], "run_id": ["r"]}, "factors"),
        ("item_factors", {"song_id": ["s"], "factors": [["a"]], "split": ["train"], "run_id": ["r"]}, "factors"),
    ]
    for name, columns, bad in cases:
        with pytest.raises(WarehouseSchemaError) as info:
            conform(name, pa.table(columns))
        msg = str(info.value)
        assert repr(bad) in msg and repr(name) in msg, msg


def test_unknown_table_is_named():
    with pytest.raises(WarehouseError, match="nope"):
        arrow_schema("nope")


# --------------------------------------------------------------------------- tables
def test_ensure_tables_creates_contract_tables_once(warehouse):
    listed = {ident[-1] for ident in warehouse.catalog.list_tables(warehouse.namespace)}
    assert listed == set(TABLE_NAMES)
    for name, expected in CONTRACT.items():
        tbl = warehouse.table(name)
        got = [(f.name, str(f.field_type), f.required) for f in tbl.schema().fields]
        assert got == expected, name
        assert tbl.location().startswith(warehouse.location)
        empty = warehouse.read(name)
        assert empty.num_rows == 0 and empty.schema == arrow_schema(name), name
    locations = {n: warehouse.table(n).metadata_location for n in TABLE_NAMES}
    assert warehouse.ensure_tables() == []
    assert {n: warehouse.table(n).metadata_location for n in TABLE_NAMES} == locations
    assert all(warehouse.snapshot_count(n) == 0 for n in TABLE_NAMES)


def test_append_is_idempotent_per_run_id(warehouse):
    rows = embeddings([("T1", "v1", [1, 2], [0.5]), ("T2", "v1", [3, 4], [0.25])])
    assert warehouse.append("embeddings", rows, run_id="embed-1") is True
    assert warehouse.snapshot_count("embeddings") == 1
    assert warehouse.append("embeddings", rows, run_id="embed-1") is False
    assert warehouse.snapshot_count("embeddings") == 1
    got = warehouse.read("embeddings")
    assert got.num_rows == 2 and got.schema == arrow_schema("embeddings")
    t1 = by_key(got, "embeddings")[("T1", "v1")]
    assert t1["predicted_factors"] == [1.0, 2.0] and t1["embedding"] == [0.5]
    assert t1["computed_at"] == NOW  # microseconds survive
    assert warehouse.has_run("embeddings", "embed-1")
    assert warehouse.table("embeddings").current_snapshot().summary["deepcontent.run-id"] == "embed-1"
    # another run appends; an empty append writes nothing
    assert warehouse.append("embeddings", rows, run_id="embed-2") is True
    assert warehouse.append("embeddings", rows.slice(0, 0), run_id="embed-3") is False
    assert warehouse.read("embeddings").num_rows == 4
    assert warehouse.snapshot_count("embeddings") == 2
    assert warehouse.run_ids("embeddings") == {"embed-1", "embed-2"}


def test_upsert_replaces_changed_adds_new_and_skips_identical(warehouse):
    first = embeddings([("T1", "v1", [1, 2], [0.5]), ("T2", "v1", [3, 4], [0.25]), ("T1", "v0", [0, 0], [0.0])])
    assert warehouse.upsert("embeddings", first, run_id="u1") is True
    n = warehouse.snapshot_count("embeddings")
    assert warehouse.upsert("embeddings", first, run_id="u2") is False  # identical: no commit
    assert warehouse.snapshot_count("embeddings") == n

    # An embedding changes when its audio does (the table's change column): the same audio with
    # other vectors (a recomputation on other hardware) is not a change.
    same_audio = embeddings([("T1", "v1", [1.0001, 2], [0.5])])
    assert warehouse.upsert("embeddings", same_audio, run_id="u2b") is False

    second = embeddings([("T1", "v1", [9, 2], [0.5]), ("T3", "v1", [5, 6], [0.75])], audio="new")  # T1/v1 changed, T3 new
    assert warehouse.upsert("embeddings", second, run_id="u3") is True
    n = warehouse.snapshot_count("embeddings")
    got = by_key(warehouse.read("embeddings"), "embeddings")  # asserts one row per key
    assert set(got) == {("T1", "v1"), ("T2", "v1"), ("T1", "v0"), ("T3", "v1")}
    assert got[("T1", "v1")]["predicted_factors"] == [9.0, 2.0]
    assert got[("T1", "v0")]["predicted_factors"] == [0.0, 0.0]  # same track, other key: kept
    assert got[("T2", "v1")]["predicted_factors"] == [3.0, 4.0]
    assert warehouse.has_run("embeddings", "u3") and not warehouse.has_run("embeddings", "u2")

    assert warehouse.upsert("embeddings", second, run_id="u4") is False
    assert warehouse.upsert("embeddings", second.slice(0, 1), run_id="u5") is False
    assert warehouse.snapshot_count("embeddings") == n


def test_upsert_composite_key_keeps_untouched_rows(warehouse):
    def sim(rows):
        return pa.table({
            "track_id": [r[0] for r in rows], "neighbor_track_id": [r[1] for r in rows],
            "rank": pa.array([r[2] for r in rows], pa.int64()), "score": [r[3] for r in rows],
            "model_version": ["v1"] * len(rows),
        })

    assert warehouse.upsert("similar_tracks", sim([("A", "B", 1, 0.9), ("A", "C", 2, 0.8), ("B", "A", 1, 0.9)]),
                            run_id="n1")
    assert warehouse.upsert("similar_tracks", sim([("A", "D", 2, 0.85)]), run_id="n2")
    got = by_key(warehouse.read("similar_tracks"), "similar_tracks")
    assert {k: v["neighbor_track_id"] for k, v in got.items()} == {
        ("A", "v1", 1): "B", ("A", "v1", 2): "D", ("B", "v1", 1): "A"}
    with pytest.raises(WarehouseSchemaError, match="more than once"):
        warehouse.upsert("similar_tracks", sim([("A", "B", 1, 0.9), ("A", "C", 1, 0.8)]), run_id="n3")


def test_upsert_many_keys_uses_range_probe_correctly(warehouse):
    # > 200 distinct keys takes the min/max range path: stored rows inside the range that the
    # upsert does not mention must survive the overwrite untouched.
    def tracks(ids, title):
        return pa.table({"track_id": [f"T{i:04d}" for i in ids], "song_id": [f"S{i:04d}" for i in ids],
                         "title": [title(i) for i in ids]})

    assert warehouse.upsert("tracks", tracks(range(1000), lambda i: "old"), run_id="t1")
    changed = list(range(100, 900, 3))  # 267 ids spread through the middle of the stored range
    update = pa.concat_tables([tracks(changed, lambda i: "new"), tracks(range(2000, 2100), lambda i: "added")])
    assert warehouse.upsert("tracks", update, run_id="t2") is True
    got = by_key(warehouse.read("tracks"), "tracks")
    assert len(got) == 1100
    expected = {f"T{i:04d}": ("new" if i in set(changed) else "old") for i in range(1000)}
    expected.update({f"T{i:04d}": "added" for i in range(2000, 2100)})
    assert {k[0]: v["title"] for k, v in got.items()} == expected
    n = warehouse.snapshot_count("tracks")
    assert warehouse.upsert("tracks", update, run_id="t3") is False
    assert warehouse.snapshot_count("tracks") == n


def test_upsert_collapses_duplicates_left_by_appends(warehouse):
    rows = pa.table({"song_id": ["S1", "S2"], "split": ["train", "test"]})
    warehouse.append("splits", rows, run_id="a1")
    warehouse.append("splits", rows.slice(0, 1), run_id="a2")  # S1 now stored twice
    assert warehouse.upsert("splits", rows, run_id="u1") is True
    assert sorted(warehouse.read("splits").to_pylist(), key=lambda r: r["song_id"]) == rows.to_pylist()
    assert warehouse.upsert("splits", rows, run_id="u2") is False


def test_wrong_column_type_names_table_and_column(warehouse):
    bad = pa.table({"user_id": ["u1"], "song_id": ["s1"], "play_count": ["many"]})
    for write in (warehouse.append, warehouse.upsert):
        with pytest.raises(WarehouseSchemaError) as info:
            write("plays", bad, run_id="r")
        assert "'plays'" in str(info.value) and "'play_count'" in str(info.value)
    assert warehouse.snapshot_count("plays") == 0


def test_read_with_filter(warehouse):
    warehouse.append("embeddings", embeddings([("T1", "v1", [1], [1]), ("T1", "v2", [2], [2])]), run_id="r")
    from pyiceberg.expressions import EqualTo

    got = warehouse.read("embeddings", EqualTo("model_version", "v2"))
    assert got.column("predicted_factors").to_pylist() == [[2.0]]
    # A value is a literal, never SQL: an injected OR matches nothing, and strings are refused.
    assert warehouse.read("embeddings", EqualTo("model_version", "v2' OR '1'='1")).num_rows == 0
    with pytest.raises(WarehouseError, match="pyiceberg expression"):
        warehouse.read("embeddings", "model_version = 'v2' OR model_version = 'v1'")
    assert warehouse.read("embeddings", columns=["track_id"]).column_names == ["track_id"]


# --------------------------------------------------------------------------- secrets
def test_secrets_never_shown(s3_server, tmp_path, caplog, monkeypatch):
    secret = s3_server.credentials.secret_access_key
    storage = Storage(f"s3://wh-{uuid.uuid4().hex[:10]}", endpoint_url=s3_server.endpoint_url,
                      credentials=s3_server.credentials)
    storage.ensure_root()
    caplog.set_level(logging.DEBUG)
    texts = []
    with Warehouse.from_config(WarehouseConfig(uri=f"sqlite:///{tmp_path}/c.db"), storage) as wh:
        wh.ensure_tables(["tracks"])
        wh.append("tracks", pa.table({"track_id": ["T"], "song_id": ["S"]}), run_id="r")
        texts += [repr(wh), str(wh), repr(wh.catalog), repr(wh.table("tracks"))]

    # the same storage but a server that is gone: the S3 error must not carry the secret
    dead = Storage(storage.root, endpoint_url="http://127.0.0.1:9", credentials=s3_server.credentials)
    with Warehouse.from_config(WarehouseConfig(uri=f"sqlite:///{tmp_path}/d.db"), dead) as wh:
        with pytest.raises(WarehouseError) as info:
            wh.ensure_tables(["tracks"])
        texts.append("".join(traceback.format_exception(info.value)))

    # a catalog password from the environment, with a catalog that cannot be opened
    monkeypatch.setenv("DC_TEST_CATALOG_PASSWORD", secret)
    cfg = WarehouseConfig(uri="postgresql+nosuchdriver://dc@127.0.0.1:1/iceberg",
                          catalog_password_env="DC_TEST_CATALOG_PASSWORD")
    with pytest.raises(WarehouseError) as info:
        Warehouse.from_config(cfg, storage)
    texts.append("".join(traceback.format_exception(info.value)))
    monkeypatch.delenv("DC_TEST_CATALOG_PASSWORD")
    with pytest.raises(WarehouseError, match="DC_TEST_CATALOG_PASSWORD"):
        Warehouse.from_config(cfg, storage)

    texts.append(caplog.text)
    for text in texts:
        assert secret not in text


@pytest.mark.parametrize("answer", ["NO_SUCH_KEY during GetObject operation: The specified key does not exist.",
                                    "RESOURCE_NOT_FOUND during GetObject operation: "])
def test_table_load_waits_for_metadata_another_writer_just_wrote(warehouse, monkeypatch, answer):
    # The embedded S3 server sometimes answers a GET of metadata another writer has just
    # committed with a 404, with or without an error body (pyarrow says NO_SUCH_KEY or
    # RESOURCE_NOT_FOUND); when is a matter of timing, so the answer is injected here.
    warehouse.ensure_tables(["embeddings"])
    real, calls = warehouse.catalog.load_table, []

    def flaky(ident):
        calls.append(ident)
        if len(calls) < 3:
            raise OSError(f"AWS Error {answer}")
        return real(ident)

    monkeypatch.setattr(warehouse.catalog, "load_table", flaky)
    assert warehouse.table("embeddings").name()[-1] == "embeddings" and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(warehouse.catalog, "load_table", lambda ident: (_ for _ in ()).throw(
        OSError("AWS Error ACCESS_DENIED during GetObject operation")))
    with pytest.raises(WarehouseError, match="ACCESS_DENIED"):  # any other I/O error is not retried
        warehouse.table("embeddings")
