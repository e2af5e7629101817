"""Warehouse tables: the data contract as Apache Iceberg schemas, and idempotent commits.

Every warehouse table is declared once, in :data:`deepcontent.datasets.TABLES` (Arrow schema
and key columns); its Iceberg schema — fixed field ids, required/optional flags, identifier
(key) fields — is derived here by :func:`iceberg_schema`, and the Arrow schema reads return is
derived back from that by pyiceberg. :class:`Warehouse` opens the configured catalog (SQLite SQL catalog
in the embedded default; Postgres, REST or Glue on a cluster) with Iceberg's data files under
``<storage.root>/warehouse`` on the same object store the rest of the system uses, and offers
the few operations stages need:

* :meth:`Warehouse.append` — idempotent per run id: the run id is recorded in the snapshot
  summary (``deepcontent.run-id``), and appending again with the same run id adds nothing;
* :meth:`Warehouse.upsert` — key-based on :data:`TABLE_KEYS`: changed rows replace the old
  ones, new keys are added, and re-upserting identical rows commits nothing at all.

Each write is one Iceberg commit (a transaction), so readers see all of it or none of it, and a
crashed writer leaves at most unreferenced files behind. Incoming Arrow data is conformed to the
table's Arrow schema first; a column that does not fit raises :class:`WarehouseSchemaError`
naming the table and the column.

Secrets (S3 keys, the catalog password) are passed to pyiceberg as properties but never appear
in ``repr``, log lines or the exceptions raised here.

No stage logic lives here: which rows to write, and when, is the stages' business.
"""

from __future__ import annotations

import logging
import os
import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

# Importing storage first sets AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED, which the AWS
# C++ SDK inside pyarrow (used by pyiceberg's PyArrowFileIO) needs against non-AWS S3 servers.
from deepcontent.storage import Storage, split_uri

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError  # noqa: E402
from pyiceberg.expressions import (  # noqa: E402
    AlwaysTrue,
    And,
    BooleanExpression,
    In,
)
from pyiceberg.io.pyarrow import schema_to_pyarrow  # noqa: E402
from pyiceberg.schema import Schema  # noqa: E402
from pyiceberg.types import (  # noqa: E402
    BinaryType,
    BooleanType,
    DoubleType,
    FloatType,
    IntegerType,
    ListType,
    LongType,
    NestedField,
    StringType,
    TimestampType,
    TimestamptzType,
)

from deepcontent.datasets import TABLES, Table  # noqa: E402
from deepcontent.errors import WarehouseError, WarehouseSchemaError  # noqa: E402
from deepcontent.faults import crash_point  # noqa: E402
from deepcontent.redact import looks_secret, redact_text, register_secret  # noqa: E402

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

    from deepcontent.config import WarehouseConfig

log = logging.getLogger(__name__)

#: Snapshot-summary property that records which run produced a snapshot.
RUN_ID_PROPERTY = "deepcontent.run-id"

_COMMIT_ATTEMPTS = 8
# pyiceberg retries a commit that lost a race by re-applying the same rows on top of the
# winner's snapshot: for an upsert planned against the old snapshot that duplicates keys. The
# project's own loop re-plans instead, so the library's retry is switched off on every table.
TABLE_PROPERTIES = {"commit.retry.num-retries": "0"}


def _missing_object(exc: BaseException) -> bool:
    """Whether an I/O error says the object is not there (a local FileNotFoundError, or an S3
    NoSuchKey / 404 that pyarrow reports as a plain OSError: ``NO_SUCH_KEY`` when the server's
    answer has an error body, ``RESOURCE_NOT_FOUND`` when it has none)."""
    if isinstance(exc, FileNotFoundError):
        return True
    text = str(exc)
    return isinstance(exc, OSError) and any(
        code in text for code in ("NO_SUCH_KEY", "NoSuchKey", "RESOURCE_NOT_FOUND", "HTTP 404"))


def _backoff(attempt: int) -> None:
    """Sleep a little (randomised) before re-planning a commit another writer beat."""
    time.sleep(min(0.05 * 2 ** attempt, 1.0) * (0.5 + random.random()))


# --------------------------------------------------------------------------- schemas
def _iceberg_type(t: pa.DataType, next_id: list[int]):
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return StringType()
    if pa.types.is_int32(t):
        return IntegerType()
    if pa.types.is_int64(t):
        return LongType()
    if pa.types.is_float32(t):
        return FloatType()
    if pa.types.is_float64(t):
        return DoubleType()
    if pa.types.is_boolean(t):
        return BooleanType()
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return BinaryType()
    if pa.types.is_timestamp(t) and t.unit == "us":
        return TimestamptzType() if t.tz is not None else TimestampType()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        element_id = next_id[0]
        next_id[0] += 1
        return ListType(element_id, _iceberg_type(t.value_type, next_id), element_required=not t.value_field.nullable)
    raise WarehouseSchemaError(f"no Iceberg type for Arrow type {t}")


def iceberg_schema(table: Table) -> Schema:
    """The Iceberg schema of a catalog table, derived from its Arrow schema: field ids in
    Iceberg's fresh-id order (top-level fields 1..n, then nested element ids in field order),
    non-nullable fields ``required``, the key columns as identifier fields."""
    n = len(table.schema)
    next_id = [n + 1]
    fields = [NestedField(i + 1, f.name, _iceberg_type(f.type, next_id), required=not f.nullable)
              for i, f in enumerate(table.schema)]
    ids = [table.schema.get_field_index(k) + 1 for k in table.keys]
    return Schema(*fields, identifier_field_ids=ids)


def partition_spec(table: Table, schema: Schema):
    """The Iceberg partition spec of a catalog table (:attr:`Table.partition`): identity and
    bucket fields on its columns, field ids from 1000 as Iceberg numbers them."""
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.transforms import BucketTransform, IdentityTransform

    fields = []
    for i, p in enumerate(table.partition):
        kind, column = p[0], p[1]
        source = schema.find_field(column).field_id
        if kind == "identity":
            fields.append(PartitionField(source_id=source, field_id=1000 + i, transform=IdentityTransform(), name=column))
        elif kind == "bucket":
            fields.append(PartitionField(source_id=source, field_id=1000 + i, transform=BucketTransform(int(p[2])),
                                         name=f"{column}_bucket"))
        else:
            raise WarehouseSchemaError(f"table {table.name!r}: unknown partition transform {kind!r}")
    return PartitionSpec(*fields)


#: The Iceberg schema of every warehouse table (:data:`deepcontent.datasets.TABLES`).
TABLE_SCHEMAS: dict[str, Schema] = {name: iceberg_schema(t) for name, t in TABLES.items()}
#: Its partition spec (unpartitioned for the tables a stage re-derives whole).
TABLE_SPECS = {name: partition_spec(t, TABLE_SCHEMAS[name]) for name, t in TABLES.items()}
#: Key columns per table: at most one row per key after an upsert.
TABLE_KEYS: dict[str, tuple[str, ...]] = {name: t.keys for name, t in TABLES.items()}
TABLE_NAMES: tuple[str, ...] = tuple(TABLES)


def _check_name(name: str) -> None:
    if name not in TABLE_SCHEMAS:
        raise WarehouseError(f"unknown warehouse table {name!r}; known tables: {', '.join(TABLE_NAMES)}")


def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema of a contract table, exactly as :meth:`Warehouse.read` returns it.

    Derived from the Iceberg schema by pyiceberg (strings are ``large_string``, lists
    ``large_list<element: ...>``, ``timestamptz`` is ``timestamp[us, tz=UTC]``, required fields
    are non-nullable), so the two cannot drift apart."""
    _check_name(name)
    return schema_to_pyarrow(TABLE_SCHEMAS[name], include_field_ids=False)


# --------------------------------------------------------------------------- conforming data
def _kind(t: pa.DataType):
    """A coarse type family used to decide which casts are allowed (no string<->number)."""
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    ):
        return "binary"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_date(t):
        return "date"
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    ):
        return ("list", _kind(t.value_type))
    return str(t)


def _kinds_fit(src, dst) -> bool:
    if src == dst or src == "null":
        return True
    if src == "int" and dst == "float":
        return True
    if isinstance(src, tuple) and isinstance(dst, tuple):
        return _kinds_fit(src[1], dst[1])
    return False


def conform(name: str, data: pa.Table) -> pa.Table:
    """Return ``data`` cast to the Arrow schema of table ``name`` (column order included).

    Allowed: widening/narrowing within a type family with values checked (int64 -> int32
    fails on overflow), int -> float, string/binary/list layout changes (``string`` ->
    ``large_string``, ``list<item>`` -> ``large_list<element>``), dictionary decoding, and a
    missing *optional* column (filled with nulls). Refused with :class:`WarehouseSchemaError`
    naming the table and column: an unknown or missing required column, a different type family
    (string <-> number), values that do not fit, nulls in a required column or inside a vector.
    """
    _check_name(name)
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, pa.Table):
        raise WarehouseSchemaError(f"table {name!r}: expected a pyarrow.Table, got {type(data).__name__}")
    target = arrow_schema(name)
    extra = [c for c in data.column_names if target.get_field_index(c) < 0]
    if extra:
        raise WarehouseSchemaError(
            f"table {name!r}: unexpected column(s) {extra}; the contract columns are {target.names}"
        )
    if len(set(data.column_names)) != len(data.column_names):
        raise WarehouseSchemaError(f"table {name!r}: duplicate column names in {data.column_names}")
    arrays = []
    for field in target:
        if field.name not in data.column_names:
            if not field.nullable:
                raise WarehouseSchemaError(f"table {name!r}: required column {field.name!r} is missing")
            arrays.append(pa.nulls(data.num_rows, type=field.type))
            continue
        col = data.column(field.name)
        if not _kinds_fit(_kind(col.type), _kind(field.type)):
            raise WarehouseSchemaError(
                f"table {name!r}: column {field.name!r} has type {col.type}, which does not fit {field.type}"
            )
        try:
            col = col.cast(field.type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise WarehouseSchemaError(
                f"table {name!r}: column {field.name!r} of type {data.column(field.name).type} "
                f"cannot be cast to {field.type}: {exc}"
            ) from None
        if not field.nullable and col.null_count:
            raise WarehouseSchemaError(
                f"table {name!r}: required column {field.name!r} has {col.null_count} null value(s)"
            )
        if _is_list(field.type) and not field.type.value_field.nullable:
            inner_nulls = sum(pc.list_flatten(chunk).null_count for chunk in col.chunks)
            if inner_nulls:
                raise WarehouseSchemaError(
                    f"table {name!r}: column {field.name!r} has {inner_nulls} null element(s) inside its lists"
                )
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=target)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


# --------------------------------------------------------------------------- row comparison
def _flat_equal(x: pa.Array, y: pa.Array) -> np.ndarray:
    """Element-wise equality of two flat arrays; null == null and NaN == NaN count as equal."""
    eq = pc.fill_null(pc.equal(x, y), False)
    same = pc.or_(eq, pc.and_(pc.is_null(x), pc.is_null(y)))
    if pa.types.is_floating(x.type):
        same = pc.or_(same, pc.fill_null(pc.and_(pc.is_nan(x), pc.is_nan(y)), False))
    return same.to_numpy(zero_copy_only=False).astype(bool)


def _column_equal(x: pa.ChunkedArray | pa.Array, y: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row-wise equality of two aligned columns of the same type (vectorised for flat columns
    and lists of flat values)."""
    if isinstance(x, pa.ChunkedArray):
        x = x.combine_chunks()
    if isinstance(y, pa.ChunkedArray):
        y = y.combine_chunks()
    n = len(x)
    if n == 0:
        return np.ones(0, dtype=bool)
    t = x.type
    if _is_list(t) and not pa.types.is_nested(t.value_type):
        if pa.types.is_fixed_size_list(t):
            x, y = x.cast(pa.large_list(t.value_field)), y.cast(pa.large_list(t.value_field))
        lx, ly = pc.list_value_length(x), pc.list_value_length(y)
        out = _flat_equal(lx, ly)  # equal lengths, or both lists null
        check = out & ~np.asarray(pc.is_null(lx).to_numpy(zero_copy_only=False), dtype=bool)
        rows = np.flatnonzero(check)
        if len(rows):
            idx = pa.array(rows)
            xs, ys = x.take(idx), y.take(idx)
            elem_eq = _flat_equal(pc.list_flatten(xs), pc.list_flatten(ys))
            parents = np.asarray(pc.list_parent_indices(xs).to_numpy(zero_copy_only=False))
            mismatches = np.bincount(parents[~elem_eq], minlength=len(rows))
            out[rows] = mismatches == 0
        return out
    if pa.types.is_nested(t):
        xs, ys = x.to_pylist(), y.to_pylist()
        return np.fromiter((a == b for a, b in zip(xs, ys)), dtype=bool, count=n)
    return _flat_equal(x, y)


# --------------------------------------------------------------------------- the warehouse
class Warehouse:
    """The project's Iceberg tables in one catalog namespace.

    Build it with :meth:`from_config`. Not picklable (it holds a catalog connection): tasks
    write staging data through :class:`~deepcontent.storage.Storage`, the driver commits here.
    """

    def __init__(
        self,
        catalog: "Catalog",
        *,
        namespace: str,
        location: str,
        catalog_type: str = "sql",
        secrets: Iterable[str] = (),
    ) -> None:
        self.catalog = catalog
        self.namespace = namespace
        self.location = location
        self.catalog_type = catalog_type
        # Exact strings to scrub from any message we raise; never printed themselves.
        self._secrets = tuple(s for s in secrets if s)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: "WarehouseConfig", storage: Storage) -> "Warehouse":
        """Open the catalog described by ``cfg`` with Iceberg files on ``storage``.

        ``type: sql`` builds a pyiceberg ``SqlCatalog`` (SQLite path made if missing; for
        Postgres the password is read from the env var named by ``catalog_password_env``);
        ``rest`` and ``glue`` go through ``load_catalog``. Iceberg's FileIO gets the storage's
        endpoint, region, credentials and path-style addressing, so it talks to the same server
        as everything else. ``cfg.properties`` are passed last and win."""
        location = (cfg.location or storage.uri("warehouse")).rstrip("/")
        secrets: list[str] = []
        props: dict[str, str] = {"warehouse": location, **_fileio_properties(storage, location, secrets)}

        password = None
        if cfg.catalog_password_env:
            password = os.environ.get(cfg.catalog_password_env)
            if not password:
                raise WarehouseError(
                    f"warehouse.catalog_password_env names {cfg.catalog_password_env!r}, but that "
                    "environment variable is not set"
                )
            secrets.append(password)

        if cfg.type == "sql":
            props["uri"] = _sql_uri(cfg.uri, password, secrets)
        elif cfg.type == "rest":
            props["uri"] = cfg.uri
            if password is not None and "token" not in cfg.properties:
                props["token"] = password
        elif cfg.type == "glue":
            pass  # Glue is addressed through the AWS account; no catalog URI
        for key, value in cfg.properties.items():
            if looks_secret(key):
                secrets.append(str(value))
            props[key] = str(value)
        for secret in secrets:  # masked wherever they might surface: errors, logs, manifests
            register_secret(secret)
        try:
            if cfg.type == "sql":
                from pyiceberg.catalog.sql import SqlCatalog

                catalog = SqlCatalog(cfg.catalog_name, **props)
            else:
                from pyiceberg.catalog import load_catalog

                catalog = load_catalog(cfg.catalog_name, **{"type": cfg.type, **props})
        except Exception as exc:
            msg = _redact(f"cannot open the {cfg.type} Iceberg catalog {cfg.catalog_name!r}: {exc}", secrets)
            raise WarehouseError(msg) from None
        wh = cls(catalog, namespace=cfg.namespace, location=location, catalog_type=cfg.type, secrets=secrets)
        log.info("opened warehouse %r", wh)
        return wh

    def __repr__(self) -> str:
        return (
            f"Warehouse(catalog={self.catalog.name!r}, type={self.catalog_type!r}, "
            f"namespace={self.namespace!r}, location={self.location!r})"
        )

    def __getstate__(self):
        raise TypeError("Warehouse is not picklable: commit from the driver, write data through Storage in tasks")

    def close(self) -> None:
        """Release the catalog's connections (SQL engine) if it has any."""
        engine = getattr(self.catalog, "engine", None)
        if engine is not None:
            engine.dispose()

    def __enter__(self) -> "Warehouse":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _redact(self, text: str) -> str:
        return _redact(text, self._secrets)

    def _fail(self, what: str, exc: BaseException) -> WarehouseError:
        return WarehouseError(self._redact(f"{what}: {type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ tables
    def identifier(self, name: str) -> tuple[str, str]:
        _check_name(name)
        return (self.namespace, name)

    def ensure_tables(self, names: Sequence[str] | None = None) -> list[str]:
        """Create the namespace and the named contract tables (all when ``None``) if missing.

        Idempotent: existing tables are left as they are, after checking that their schema
        is the contract's (a mismatch raises, naming the table). Returns the tables created."""
        names = list(TABLE_NAMES if names is None else names)
        for name in names:
            _check_name(name)
        created: list[str] = []
        try:
            self.catalog.create_namespace_if_not_exists(self.namespace)
            for name in names:
                ident = self.identifier(name)
                if self.catalog.table_exists(ident):
                    tbl = self.catalog.load_table(ident)
                    existing = tbl.schema()
                    if not _same_schema(existing, TABLE_SCHEMAS[name]):
                        raise WarehouseSchemaError(
                            f"table {name!r} exists in {self.namespace!r} with a schema that differs "
                            f"from the contract:\n{existing}\nexpected:\n{TABLE_SCHEMAS[name]}"
                        )
                    if any(tbl.properties.get(k) != v for k, v in TABLE_PROPERTIES.items()):
                        with tbl.transaction() as tx:  # a table made before the property was set
                            tx.set_properties(TABLE_PROPERTIES)
                    if tbl.spec().is_unpartitioned() and not TABLE_SPECS[name].is_unpartitioned():
                        _evolve_spec(tbl, TABLES[name])  # made before it was partitioned
                    continue
                self.catalog.create_table_if_not_exists(ident, schema=TABLE_SCHEMAS[name], properties=TABLE_PROPERTIES,
                                                        partition_spec=TABLE_SPECS[name])
                created.append(name)
        except WarehouseError:
            raise
        except Exception as exc:
            raise self._fail(f"cannot create warehouse tables in {self.namespace!r}", exc) from None
        if created:
            log.info("created warehouse tables %s in %s", created, self.namespace)
        return created

    def table(self, name: str) -> "Table":
        """The pyiceberg table (freshly loaded, so it sees the latest commit)."""
        ident = self.identifier(name)
        for attempt in range(_COMMIT_ATTEMPTS):
            try:
                return self.catalog.load_table(ident)
            except NoSuchTableError:
                raise WarehouseError(
                    f"warehouse table {'.'.join(ident)} does not exist; run ensure_tables() first"
                ) from None
            except OSError as exc:
                # The catalog names metadata another writer has just written; an object store
                # may take a moment to show it (read-after-write lag on some servers: the
                # embedded rclone server answers NoSuchKey, which pyarrow raises as a plain
                # OSError). Any other I/O error is not retried.
                if not _missing_object(exc):
                    raise self._fail(f"cannot load warehouse table {'.'.join(ident)}", exc) from None
                if attempt == _COMMIT_ATTEMPTS - 1:
                    raise self._fail(f"cannot load warehouse table {'.'.join(ident)}", exc) from None
                _backoff(attempt)
            except Exception as exc:
                raise self._fail(f"cannot load warehouse table {'.'.join(ident)}", exc) from None
        raise AssertionError("unreachable")

    def read(
        self,
        name: str,
        row_filter: BooleanExpression | None = None,
        *,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """The table's current rows as Arrow (schema :func:`arrow_schema` when all columns).

        ``row_filter`` is a pyiceberg expression (``EqualTo("model_version", version)``). Filter
        strings are refused: a value spliced into one (``v1' OR '1'='1``) changes its meaning."""
        if row_filter is not None and not isinstance(row_filter, BooleanExpression):
            raise WarehouseError(f"read({name!r}): row_filter must be a pyiceberg expression, got "
                                 f"{type(row_filter).__name__} (build it with pyiceberg.expressions, never a string)")
        tbl = self.table(name)
        try:
            scan = tbl.scan(
                row_filter=AlwaysTrue() if row_filter is None else row_filter,
                selected_fields=tuple(columns) if columns else ("*",),
            )
            return scan.to_arrow()
        except Exception as exc:
            raise self._fail(f"cannot read warehouse table {name!r}", exc) from None

    def snapshot_count(self, name: str) -> int:
        """Number of snapshots the table's metadata holds (its commit history, until expired)."""
        return len(self.table(name).snapshots())

    def run_ids(self, name: str) -> set[str]:
        """Run ids recorded in the table's snapshot summaries."""
        return _run_ids(self.table(name))

    def has_run(self, name: str, run_id: str) -> bool:
        """Whether a snapshot of ``name`` was committed by ``run_id``."""
        return run_id in self.run_ids(name)

    # ------------------------------------------------------------------ writes
    def append(self, name: str, data: pa.Table, *, run_id: str) -> bool:
        """Append ``data`` in one commit tagged with ``run_id``; idempotent per run id.

        Returns True when a snapshot was committed, False when ``run_id`` had already committed
        to this table (a retried or re-run stage) or ``data`` is empty. The check and the commit
        are retried together if another writer commits in between."""
        _check_run_id(run_id)
        data = conform(name, data)
        if data.num_rows == 0:
            return False
        last_error = ""
        for attempt in range(_COMMIT_ATTEMPTS):
            tbl = self.table(name)
            if run_id in _run_ids(tbl):
                log.info("table %s already has run %s; append skipped", name, run_id)
                return False
            try:
                crash_point(f"warehouse:before_commit:{name}")
                tbl.append(data, snapshot_properties={RUN_ID_PROPERTY: run_id})
            except (CommitFailedException, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                # Someone else committed first, or the store failed a write before the catalog
                # commit: reload, re-check the run id, retry.
                _backoff(attempt)
                continue
            except Exception as exc:
                raise self._fail(f"cannot append to warehouse table {name!r} (run {run_id})", exc) from None
            log.info("appended %d rows to %s (run %s)", data.num_rows, name, run_id)
            _note_commit(self.table(name), name, run_id)
            return True
        raise WarehouseError(self._redact(f"append to {name!r} (run {run_id}) failed {_COMMIT_ATTEMPTS} times; "
                                          f"last: {last_error}"))

    def replace(self, name: str, parts, *, run_id: str) -> bool:
        """Make the table hold exactly the rows of ``parts``, in one commit tagged ``run_id``.

        For tables a stage re-derives whole on every run (canonical plays, the id maps): the
        parts are written one at a time (a part is a task's output, so the driver never holds
        the whole table) inside one transaction that first deletes every row. ``parts`` is a
        sequence of tables or a function returning an iterable of them (called again if the
        commit must be retried). Idempotent per run id: a run that already committed to the
        table changes nothing and returns False."""
        _check_run_id(run_id)
        make_parts = parts if callable(parts) else (lambda: parts)
        last_error = ""
        for attempt in range(_COMMIT_ATTEMPTS):
            tbl = self.table(name)
            if run_id in _run_ids(tbl):
                log.info("table %s already has run %s; replace skipped", name, run_id)
                return False
            props = {RUN_ID_PROPERTY: run_id}
            rows = 0
            try:
                crash_point(f"warehouse:before_commit:{name}")
                with tbl.transaction() as tx:
                    if tbl.current_snapshot() is not None:
                        with warnings.catch_warnings():  # an empty table: nothing to delete is fine
                            warnings.filterwarnings("ignore", message="Delete operation did not match any records")
                            tx.delete(AlwaysTrue(), snapshot_properties=props)
                    for part in make_parts():
                        data = conform(name, part)
                        if data.num_rows:
                            tx.append(data, snapshot_properties=props)
                            rows += data.num_rows
            except (CommitFailedException, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                _backoff(attempt)
                continue
            except WarehouseError:
                raise
            except Exception as exc:
                raise self._fail(f"cannot replace warehouse table {name!r} (run {run_id})", exc) from None
            log.info("replaced %s with %d rows (run %s)", name, rows, run_id)
            _note_commit(self.table(name), name, run_id)
            return True
        raise WarehouseError(self._redact(f"replace of {name!r} (run {run_id}) failed {_COMMIT_ATTEMPTS} times; "
                                          f"last: {last_error}"))

    def upsert(self, name: str, data, *, run_id: str, heads: pa.Table | None = None) -> bool:
        """Insert or replace rows by the table's key (:data:`TABLE_KEYS`) in one commit.

        Rows whose key is new are added; rows whose key exists with different values (in the
        table's :attr:`~deepcontent.datasets.Table.compare_columns`) replace the old row; rows
        identical to what is stored are skipped. Returns False (and commits nothing) when
        nothing changes, so re-running a stage on the same data is a no-op. The commit is
        tagged with ``run_id``. ``data`` must not repeat a key.

        ``data`` is a table, a sequence of tables, or a function returning an iterable of them
        (called twice: once to plan from the key columns, once to write), so the driver holds
        one part at a time, never the whole upsert. ``heads``, when the caller already holds
        them, are the key and compare columns of every row the parts hold, in the same order:
        the plan is made from them and the parts are read once, to write (parts that do not
        hold exactly those rows fail the upsert before its commit).

        Merge-on-read (:mod:`deepcontent.table_merge`): only the key and compare columns of the
        stored rows in the partitions the incoming keys fall in are read; changed rows' old
        copies become position deletes, new and changed rows new data files, in one snapshot.
        Its cost follows the change, not the table; ``deepcontent maintain`` compacts."""
        from deepcontent import table_merge as tm

        _check_run_id(run_id)
        make_parts = data if callable(data) else ((lambda: [data]) if isinstance(data, (pa.Table, pa.RecordBatch))
                                                  else (lambda: data))
        _check_name(name)
        decl = TABLES[name]
        keys, compare = list(decl.keys), list(decl.compare_columns)
        given = heads is not None
        if not given:
            # Pass 1: the incoming keys and compare columns only.
            parts = [conform(name, p).select(keys + compare) for p in make_parts()]
            if not parts:
                return False
            heads = pa.concat_tables(parts)
        else:
            missing = [c for c in keys + compare if c not in heads.column_names]
            if missing:
                raise WarehouseSchemaError(f"table {name!r}: upsert heads lack column(s) {missing}")
            target = arrow_schema(name)
            heads = pa.table({c: heads[c].cast(target.field(c).type) for c in keys + compare})
        if not heads.num_rows:
            return False
        incoming = heads.combine_chunks()
        _check_unique(name, incoming, keys)
        last_error = ""
        for attempt in range(_COMMIT_ATTEMPTS):
            tbl = self.table(name)
            try:
                prune = _identity_filter(tbl, incoming)
                stored, tasks = tm.stored_keys(tbl, columns=keys + compare, partitions=tm.partition_values(tbl, incoming),
                                               row_filter=prune)
                plan = tm.plan_merge(incoming, stored, keys=keys, compare=compare)
                if plan.empty:
                    log.info("upsert to %s (run %s): nothing changed", name, run_id)
                    return False
                crash_point(f"warehouse:before_commit:{name}")
                with tbl.transaction() as tx:
                    with tm.MergeOnReadCommit.of(tx, {RUN_ID_PROPERTY: run_id}) as commit:
                        # Pass 2: each part's rows to write, one part at a time.
                        def rows_to_write():
                            at = 0
                            for part in make_parts():
                                n = part.num_rows
                                if at + n > incoming.num_rows:
                                    at += n
                                    break
                                part = conform(name, part)
                                if given and not all(part[c].equals(incoming[c].slice(at, n)) for c in keys + compare):
                                    raise WarehouseError(f"upsert into {name!r} (run {run_id}): rows {at}-{at + n - 1} "
                                                         f"of the parts are not the heads the plan was made from")
                                mask = plan.write[at:at + n]
                                at += n
                                if mask.any():
                                    yield part.filter(pa.array(mask))
                            if at != incoming.num_rows:
                                raise WarehouseError(f"upsert into {name!r} (run {run_id}): the plan was made from "
                                                     f"{incoming.num_rows} rows, the parts hold "
                                                     f"{'more' if at > incoming.num_rows else at}")

                        tm.write_data_files(tx, commit, rows_to_write())
                        tm.apply_deletes(tbl, commit, tasks, plan)
            except (CommitFailedException, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                # Another writer committed (or a store write failed before our commit): re-plan
                # against the current snapshot; rows that landed meanwhile are then unchanged.
                _backoff(attempt)
                continue
            except WarehouseError:
                raise
            except Exception as exc:
                raise self._fail(f"cannot upsert into warehouse table {name!r} (run {run_id})", exc) from None
            log.info("upserted into %s (run %s): %d new, %d changed rows", name, run_id, plan.n_new, plan.n_changed)
            _note_commit(self.table(name), name, run_id)
            return True
        raise WarehouseError(self._redact(f"upsert into {name!r} (run {run_id}) failed {_COMMIT_ATTEMPTS} times; "
                                          f"last: {last_error}"))

    # ------------------------------------------------------------------ maintenance
    def snapshot_id(self, name: str) -> int | None:
        """The table's current snapshot id (None before its first commit)."""
        snap = self.table(name).current_snapshot()
        return None if snap is None else snap.snapshot_id

    def metadata_location(self, name: str) -> str:
        """The table's current metadata file (what an engine without the catalog opens)."""
        return self.table(name).metadata_location

    def maintain(self, name: str, *, run_id: str, older_than_s: float, retain_last: int, min_files: int,
                 min_deleted_fraction: float = 0.1) -> dict:
        """Compact partitions whose position deletes mask ``min_deleted_fraction`` of their rows
        or that hold ``min_files`` or more data files (:func:`deepcontent.table_merge.compact_partitions`),
        then expire snapshots older than ``older_than_s`` seconds (keeping the last
        ``retain_last``). Returns counts; a table that needs nothing gets no new snapshot."""
        from deepcontent import table_merge as tm

        last_error = ""
        for attempt in range(_COMMIT_ATTEMPTS):
            tbl = self.table(name)
            try:
                crash_point(f"warehouse:before_commit:{name}")
                compacted = tm.compact_partitions(tbl, run_properties={RUN_ID_PROPERTY: run_id}, min_files=min_files,
                                                  min_deleted_fraction=min_deleted_fraction)
                if compacted["partitions"]:
                    _note_commit(self.table(name), name, run_id)
                break
            except (CommitFailedException, OSError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                _backoff(attempt)
        else:
            raise WarehouseError(self._redact(f"compaction of {name!r} failed {_COMMIT_ATTEMPTS} times; last: {last_error}"))
        tbl = self.table(name)
        snaps = sorted(tbl.snapshots(), key=lambda s: s.timestamp_ms)
        keep = {s.snapshot_id for s in snaps[-max(1, retain_last):]}
        if tbl.current_snapshot() is not None:
            keep.add(tbl.current_snapshot().snapshot_id)
        cutoff = (time.time() - older_than_s) * 1000
        expire = [s.snapshot_id for s in snaps if s.snapshot_id not in keep and s.timestamp_ms < cutoff]
        if expire:
            try:
                tbl.maintenance.expire_snapshots().by_ids(expire).commit()
            except Exception as exc:
                raise self._fail(f"cannot expire snapshots of {name!r}", exc) from None
        return {**compacted, "snapshots_expired": len(expire)}


# --------------------------------------------------------------------------- helpers
def _identity_filter(tbl: "Table", data: pa.Table):
    """A filter on the identity-partition columns (``model_version``) matching ``data``'s
    values, so the scan prunes other partitions' manifests; AlwaysTrue when there are none."""
    from pyiceberg.transforms import IdentityTransform

    schema, expr = tbl.schema(), AlwaysTrue()
    for f in tbl.spec().fields:
        if isinstance(f.transform, IdentityTransform):
            column = schema.find_field(f.source_id).name
            values = In(column, pc.unique(data[column]).to_pylist())
            expr = values if isinstance(expr, AlwaysTrue) else And(expr, values)
    return expr


def _evolve_spec(tbl: "Table", decl: Table) -> None:
    """Give a table made unpartitioned its declared partition spec (new files follow it; old
    files stay readable under spec 0 until compacted)."""
    from pyiceberg.transforms import BucketTransform, IdentityTransform

    with tbl.update_spec() as update:
        for p in decl.partition:
            if p[0] == "identity":
                update.add_field(p[1], IdentityTransform(), p[1])
            else:
                update.add_field(p[1], BucketTransform(int(p[2])), f"{p[1]}_bucket")


#: ``(run_id, table) -> {"snapshot_id", "sequence_number", "metadata_location"}`` of the commits
#: this process made: what a stage's manifest records (``StageRun.committed``).
COMMITS: dict[tuple[str, str], dict] = {}


def _note_commit(tbl: "Table", name: str, run_id: str) -> None:
    snaps = [s for s in tbl.snapshots() if s.summary is not None and s.summary[RUN_ID_PROPERTY] == run_id]
    if snaps:
        last = max(snaps, key=lambda s: s.sequence_number or 0)
        COMMITS[(run_id, name)] = {"snapshot_id": last.snapshot_id, "sequence_number": last.sequence_number,
                                   "metadata_location": tbl.metadata_location}


def _check_unique(name: str, data: pa.Table, keys: list[str]) -> None:
    counts = data.select(keys).group_by(keys).aggregate([([], "count_all")])
    dups = counts.filter(pc.greater(counts.column("count_all"), 1))
    if dups.num_rows:
        example = {k: dups.column(k)[0].as_py() for k in keys}
        raise WarehouseSchemaError(
            f"table {name!r}: {dups.num_rows} key(s) {tuple(keys)} appear more than once in the data "
            f"to upsert, e.g. {example}"
        )


def _run_ids(tbl: "Table") -> set[str]:
    out = set()
    for snap in tbl.snapshots():
        if snap.summary is not None and (rid := snap.summary[RUN_ID_PROPERTY]):
            out.add(rid)
    return out


def _check_run_id(run_id: str) -> None:
    if not isinstance(run_id, str) or not run_id.strip():
        raise WarehouseError(f"run_id must be a non-empty string, got {run_id!r}")


def _same_schema(a: Schema, b: Schema) -> bool:
    return a.as_struct() == b.as_struct() and set(a.identifier_field_ids) == set(b.identifier_field_ids)


def _redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` through the project's one redaction path, with this catalog's secrets registered."""
    for secret in secrets:
        register_secret(secret)
    return redact_text(text)


def _fileio_properties(storage: Storage, location: str, secrets: list[str]) -> dict[str, str]:
    """pyiceberg FileIO properties so Iceberg reads and writes where ``storage`` does."""
    props = {"py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"}
    if split_uri(location)[0] != "s3" and split_uri(storage.root)[0] != "s3":
        return props
    # Always give the region: without it pyiceberg asks AWS which region the bucket is in.
    props["s3.region"] = storage.region
    if storage.endpoint_url:
        props["s3.endpoint"] = storage.endpoint_url
        props["s3.force-virtual-addressing"] = "false"  # path-style, as MinIO/rclone expect
    creds = storage._credentials
    if creds is not None:
        props["s3.access-key-id"] = creds.access_key_id
        props["s3.secret-access-key"] = creds.secret_access_key
        secrets.append(creds.secret_access_key)
    return props


def _sql_uri(uri: str, password: str | None, secrets: list[str]) -> str:
    """The SQLAlchemy URI for the SQL catalog: the password put in from the environment, and
    the parent folder of a SQLite file created."""
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
    except Exception:
        raise WarehouseError("warehouse.uri is not a valid SQLAlchemy URL") from None
    if url.password:
        secrets.append(str(url.password))
    if url.get_backend_name() == "sqlite":
        db = url.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return uri
    if password is not None:
        url = url.set(password=password)
        return url.render_as_string(hide_password=False)
    return uri
