"""Object storage: URIs, bytes, streams, Parquet, listing, and publish-by-commit.

Every stage reads and writes through :class:`Storage`; nothing else in the project builds a
filesystem or an S3 client. Two schemes are supported:

* ``file:///abs/path/...`` — the local filesystem (tests, laptops, shared POSIX mounts);
* ``s3://bucket/key`` — any S3-compatible server (AWS, MinIO, the embedded ``rclone serve s3``).

``pyarrow.fs`` does the data path (Parquet, ranged reads, streams); ``boto3`` does listing and
bucket housekeeping. A :class:`Storage` pickles without its clients, so Spark and Ray tasks can
carry one in a closure and rebuild the clients on the worker.

Publish-by-commit
-----------------
A *dataset* is a prefix holding ``data/<run_id>/part-*.parquet`` files and one pointer object
``_published.json`` naming the files of the current version. Tasks write their part files under
a fresh run id (invisible to readers, who only follow the pointer); the driver then writes the
pointer once (a single PUT on S3, an atomic rename on a filesystem). A crashed or retried run
therefore never leaves half an output visible.

Every pointer carries a *generation* (1, 2, 3...) and publishing has one winner:

* on a filesystem the pointer is replaced under an exclusive ``flock`` of ``_lock`` (the kernel
  releases it when a process dies);
* on an S3 server that honours conditional writes (probed once per endpoint: AWS, MinIO) the
  pointer is written with ``If-Match`` on the ETag it was read with (``If-None-Match: *`` for
  the first version), so of two writers exactly one succeeds;
* on a server that ignores them (``rclone serve s3``) a lease object ``_lock`` is taken first:
  written with a unique token, read back after a settle delay, held only while its token is
  there, and broken once older than its lease by the server's own clock.

A publisher may say which generation it built on (``expected_generation``); when another run
published meanwhile it gets :class:`~deepcontent.errors.PublishConflict` and nothing is written.
History is ``_history/<generation>-<run_id>.json``, ordered by generation (never by a clock).
The sweep after a publish deletes only data files that no kept version names *and* that are
older than ``sweep_grace_s`` by the store's clock (another run's staged parts are younger), and
skips anything it cannot parse. Readers that lose a race with a sweep re-read the pointer.
"""

from __future__ import annotations

import configparser
import io
import json
import logging
import os
import posixpath
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

# Non-AWS S3 servers reject the AWS SDKs' default streaming checksums (HTTP 411 on upload).
# Both pyarrow's C++ SDK and botocore read this before their first request.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_REQUIRED")

import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from deepcontent.errors import CorruptFileError, PublishConflict, StorageError, UnsafeKeyError  # noqa: E402

if TYPE_CHECKING:
    from deepcontent.config import StorageConfig

POINTER = "_published.json"
LOCK = "_lock"
# Unreferenced data files younger than this (by the store's clock) are never swept: they may
# be the staged parts of a run still in flight. Six hours covers the longest stage we run.
SWEEP_GRACE_S = 6 * 3600.0


def safe_key(key: str) -> str:
    """Validate a relative object key and return it normalised (no leading/trailing slashes).

    Raises :class:`UnsafeKeyError` naming the key when it contains a NUL byte, a backslash, a
    ``..`` or ``.`` segment, or starts with ``/`` — anything that could resolve outside the root
    on a filesystem or mean different objects on different servers.
    """
    if not isinstance(key, str):
        raise UnsafeKeyError(f"object key must be a string, got {type(key).__name__}")
    if "\x00" in key:
        raise UnsafeKeyError(f"object key contains a NUL byte: {key!r}")
    if "\\" in key:
        raise UnsafeKeyError(f"object key contains a backslash: {key!r}")
    if key.startswith("/"):
        raise UnsafeKeyError(f"object key must be relative, got absolute {key!r}")
    parts = [p for p in key.split("/") if p != ""]
    for part in parts:
        if part in ("..", "."):
            raise UnsafeKeyError(f"object key has a {part!r} segment: {key!r}")
    return "/".join(parts)


def join(base_uri: str, *keys: str) -> str:
    """Join safe relative keys onto a URI: ``join("s3://b/p", "x/y")`` -> ``"s3://b/p/x/y"``."""
    out = base_uri.rstrip("/")
    for key in keys:
        k = safe_key(key)
        if k:
            out = f"{out}/{k}"
    return out


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://b/k`` -> ``("s3", "b/k")``; ``file:///a/b`` -> ``("file", "/a/b")``."""
    if uri.startswith("s3://"):
        path = uri[len("s3://"):]
        if not path or path.startswith("/"):
            raise StorageError(f"s3 URI needs a bucket: {uri!r}")
        return "s3", path
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        if not path.startswith("/"):
            raise StorageError(f"file URI must be absolute (file:///...): {uri!r}")
        return "file", path
    raise StorageError(f"unsupported URI scheme (want s3:// or file://): {uri!r}")


def relative_key(base_uri: str, uri: str) -> str:
    """The key of ``uri`` below ``base_uri`` (raises if it is not below)."""
    base = base_uri.rstrip("/") + "/"
    if not uri.startswith(base):
        raise StorageError(f"{uri!r} is not under {base_uri!r}")
    return uri[len(base):]


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    # Last-modified time as an ISO-8601 string (None when the store does not say).
    modified: str | None = None
    # The store's content tag (an S3 ETag); None on a filesystem.
    etag: str | None = None

    @property
    def version(self) -> str:
        """What changes when the object's content does: the ETag where the store gives one,
        else size and modification time (nanoseconds on a filesystem)."""
        return self.etag or f"{self.size}@{self.modified}"


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:  # never print secrets, even by accident
        return "Credentials(access_key_id='***', secret_access_key='***')"


def _credentials_from_file(path: str, profile: str) -> Credentials | None:
    parser = configparser.ConfigParser()
    if not parser.read(os.path.expanduser(path)):
        raise StorageError(f"credentials file not found or unreadable: {path}")
    if not parser.has_section(profile):
        raise StorageError(f"credentials file {path} has no [{profile}] profile")
    section = parser[profile]
    key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
    if not key or not secret:
        raise StorageError(f"credentials file {path} [{profile}] lacks aws_access_key_id/aws_secret_access_key")
    return Credentials(key, secret)


def resolve_credentials(cfg: "StorageConfig") -> Credentials | None:
    """Explicit config secret > credentials file > ``AWS_*`` environment > None (SDK default chain).
    The keys found are registered for redaction (:mod:`deepcontent.redact`)."""
    creds = _resolve_credentials(cfg)
    if creds is not None:
        from deepcontent.redact import register_secret

        register_secret(creds.access_key_id)
        register_secret(creds.secret_access_key)
    return creds


def _resolve_credentials(cfg: "StorageConfig") -> Credentials | None:
    if cfg.access_key_id is not None and cfg.secret_access_key is not None:
        return Credentials(cfg.access_key_id.get_secret_value(), cfg.secret_access_key.get_secret_value())
    if cfg.credentials_file:
        return _credentials_from_file(cfg.credentials_file, cfg.credentials_profile)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return Credentials(key, secret)
    return None


# Clients are shared per process, keyed by where they connect and as whom: a Spark or Ray worker
# unpickles a fresh Storage for every task, and a new S3 client costs ~0.3 s of CPU before its
# first upload completes (measured with the embedded server), which at 64 clips per task is
# ~5 ms per clip.
_CLIENTS: dict[tuple, Any] = {}


def _client_key(kind: str, storage: "Storage") -> tuple:
    creds = storage._credentials
    return (kind, os.getpid(), storage.region, storage.endpoint_url,
            None if creds is None else (creds.access_key_id, creds.secret_access_key))


class Storage:
    """All object-store I/O for one root URI. Cheap to pickle; clients are built lazily and
    shared by every Storage of the process that connects to the same endpoint as the same user."""

    def __init__(
        self,
        root: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        credentials: Credentials | None = None,
        sweep_grace_s: float = SWEEP_GRACE_S,
        lock_lease_s: float = 60.0,
        lock_settle_s: float = 0.25,
    ) -> None:
        split_uri(root)  # validate early, with the URI in the message
        self.root = root.rstrip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._credentials = credentials
        self.sweep_grace_s = float(sweep_grace_s)
        self.lock_lease_s = float(lock_lease_s)
        self.lock_settle_s = float(lock_settle_s)
        self._pafs: pafs.FileSystem | None = None
        self._local: pafs.FileSystem | None = None
        self._boto = None
        self._overlay: tuple[str, frozenset[str]] | None = None

    @classmethod
    def from_config(cls, cfg: "StorageConfig") -> "Storage":
        return cls(cfg.root, endpoint_url=cfg.endpoint_url, region=cfg.region, credentials=resolve_credentials(cfg),
                   sweep_grace_s=cfg.sweep_grace_s, lock_lease_s=cfg.lock_lease_s)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pafs"] = state["_local"] = state["_boto"] = None
        return state

    def __repr__(self) -> str:
        return f"Storage(root={self.root!r}, endpoint_url={self.endpoint_url!r})"

    def with_root(self, root: str) -> "Storage":
        """The same store (endpoint, region, credentials) under another root: another
        catalog's registry, another bucket."""
        return Storage(root, endpoint_url=self.endpoint_url, region=self.region, credentials=self._credentials,
                       sweep_grace_s=self.sweep_grace_s, lock_lease_s=self.lock_lease_s, lock_settle_s=self.lock_settle_s)

    def overlay(self, root: str, *, owns: Iterable[str]) -> "Storage":
        """The same store where keys under the top-level prefixes ``owns`` (``factors``,
        ``models``...) live under ``root`` and every other key under this root.

        A replicate of a catalog (another seed of the evaluation) reads this catalog's inputs
        (tracks, spectrograms, matrices) where they are and writes what it re-derives (its own
        factors, models, runs) under ``root``: nothing is copied and nothing of this catalog
        is overwritten. Travels to workers with the rest of the Storage (pickled)."""
        out = self.with_root(self.root)
        out._overlay = (root.rstrip("/"), frozenset(o.strip("/") for o in owns))
        return out

    # ----------------------------------------------------------------- clients
    def _s3fs(self) -> pafs.FileSystem:
        if self._pafs is None:
            self._pafs = _CLIENTS.get(_client_key("pyarrow", self))
        if self._pafs is None:
            kwargs: dict[str, Any] = {"region": self.region, "allow_bucket_creation": True,
                                      "connect_timeout": 10.0, "request_timeout": 120.0}
            if self._credentials is not None:
                kwargs.update(access_key=self._credentials.access_key_id, secret_key=self._credentials.secret_access_key)
            if self.endpoint_url:
                scheme, _, host = self.endpoint_url.partition("://")
                kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https", force_virtual_addressing=False)
            self._pafs = _CLIENTS[_client_key("pyarrow", self)] = pafs.S3FileSystem(**kwargs)
        return self._pafs

    def boto_client(self):
        """A boto3 S3 client for this storage (path-style, checksums only when required)."""
        if self._boto is None:
            self._boto = _CLIENTS.get(_client_key("boto3", self))
        if self._boto is None:
            import boto3
            from botocore.config import Config as BotoConfig

            kwargs: dict[str, Any] = {
                "region_name": self.region,
                "config": BotoConfig(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    retries={"max_attempts": 5, "mode": "standard"},
                ),
            }
            if self.endpoint_url:
                kwargs["endpoint_url"] = self.endpoint_url
            if self._credentials is not None:
                kwargs.update(
                    aws_access_key_id=self._credentials.access_key_id,
                    aws_secret_access_key=self._credentials.secret_access_key,
                )
            self._boto = _CLIENTS[_client_key("boto3", self)] = boto3.client("s3", **kwargs)
        return self._boto

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and in-filesystem path for ``uri``."""
        scheme, path = split_uri(uri)
        if scheme == "s3":
            return self._s3fs(), path
        if self._local is None:
            self._local = pafs.LocalFileSystem()
        return self._local, path

    # ----------------------------------------------------------------- naming
    def uri(self, *keys: str) -> str:
        """URI of a key (or joined keys) under the root (under the overlay's root for the
        prefixes it owns, :meth:`overlay`)."""
        if self._overlay is not None:
            first = next((k.strip("/") for k in keys if k and k.strip("/")), "").split("/", 1)[0]
            if first in self._overlay[1]:
                return join(self._overlay[0], *keys)
        return join(self.root, *keys)

    def raw_uri(self, raw_prefix: str, *keys: str) -> str:
        return join(self.root, raw_prefix, *keys)

    # ----------------------------------------------------------------- buckets
    def ensure_root(self) -> None:
        """Create the bucket (S3) or directory (file) of the root if it does not exist."""
        scheme, path = split_uri(self.root)
        if scheme == "file":
            os.makedirs(path, exist_ok=True)
            return
        bucket = path.split("/", 1)[0]
        client = self.boto_client()
        try:
            client.head_bucket(Bucket=bucket)
        except Exception:
            try:
                client.create_bucket(Bucket=bucket)
            except Exception as exc:
                raise StorageError(f"cannot create bucket s3://{bucket} at {self.endpoint_url or 'AWS'}: {exc}") from None

    # ----------------------------------------------------------------- bytes & streams
    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.filesystem(uri)
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            raise StorageError(f"object not found: {uri}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc}") from None

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the object)."""
        fs, path = self.filesystem(uri)
        try:
            with fs.open_input_file(path) as f:
                size = f.size()
                if offset >= size:
                    return b""
                return f.read_at(min(length, size - offset), offset)
        except FileNotFoundError:
            raise StorageError(f"object not found: {uri}") from None

    def size(self, uri: str) -> int:
        fs, path = self.filesystem(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise StorageError(f"object not found: {uri}")
        return int(info.size)

    def info(self, uri: str) -> ObjectInfo:
        """Size, modification time and (on S3) ETag of one object."""
        scheme, path = split_uri(uri)
        if scheme == "file":
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise StorageError(f"object not found: {uri}") from None
            return ObjectInfo(uri, st.st_size, _iso_ns(st.st_mtime_ns))
        bucket, _, key = path.partition("/")
        try:
            head = self.boto_client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404:
                raise StorageError(f"object not found: {uri}") from None
            raise StorageError(f"cannot stat {uri}: {exc}") from None
        return ObjectInfo(uri, int(head["ContentLength"]), head["LastModified"].isoformat(),
                          (head.get("ETag") or "").strip('"') or None)

    def exists(self, uri: str) -> bool:
        fs, path = self.filesystem(uri)
        return fs.get_file_info(path).type == pafs.FileType.File

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write an object whole. On a filesystem: temp file + rename, so readers never see a
        partial object (an S3 PUT is already all-or-nothing)."""
        fs, path = self.filesystem(uri)
        scheme, _ = split_uri(uri)
        if scheme == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        try:
            with fs.open_output_stream(path) as f:
                f.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {uri}: {exc}") from None

    def open_input(self, uri: str):
        fs, path = self.filesystem(uri)
        return fs.open_input_file(path)

    def open_output(self, uri: str):
        fs, path = self.filesystem(uri)
        if split_uri(uri)[0] == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return fs.open_output_stream(path)

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    # ----------------------------------------------------------------- listing
    def list(self, prefix_uri: str) -> list[ObjectInfo]:
        """Every object under a prefix, recursively, sorted by URI."""
        scheme, path = split_uri(prefix_uri)
        out: list[ObjectInfo] = []
        if scheme == "file":
            base = Path(path)
            if not base.exists():
                return []
            for dirpath, _, files in os.walk(base):
                for name in files:
                    full = os.path.join(dirpath, name)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:  # a temp file renamed or a part swept meanwhile
                        continue
                    out.append(ObjectInfo("file://" + full, st.st_size, _iso_ns(st.st_mtime_ns)))
        else:
            bucket, _, key_prefix = path.partition("/")
            if key_prefix and not key_prefix.endswith("/"):
                key_prefix += "/"
            paginator = self.boto_client().get_paginator("list_objects_v2")
            try:
                for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
                    for obj in page.get("Contents", []):
                        modified = obj["LastModified"].isoformat() if obj.get("LastModified") else None
                        out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), modified,
                                              (obj.get("ETag") or "").strip('"') or None))
            except Exception as exc:
                if "NoSuchBucket" in str(exc):
                    return []
                raise StorageError(f"cannot list {prefix_uri}: {exc}") from None
        out.sort(key=lambda o: o.uri)
        return out

    def delete(self, uris: Iterable[str]) -> int:
        """Delete objects (missing ones are ignored); returns how many were asked for.

        S3 deletes go through boto3 in batches of 1,000: pyarrow's delete would also write a
        directory-marker object to keep the "folder", which some servers refuse."""
        by_bucket: dict[str, list[str]] = {}
        n = 0
        for uri in uris:
            scheme, path = split_uri(uri)
            n += 1
            if scheme == "file":
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            else:
                bucket, _, key = path.partition("/")
                by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for i in range(0, len(keys), 1000):
                resp = self.boto_client().delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
                errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
                if errors:
                    raise StorageError(f"cannot delete s3://{bucket}/{errors[0].get('Key')}: {errors[0].get('Message')}")
        return n

    def delete_prefix(self, prefix_uri: str) -> int:
        return self.delete(o.uri for o in self.list(prefix_uri))

    def sweep_prefix(self, prefix_uri: str, *, own: str | None = None) -> int:
        """Delete everything under ``own`` (a run's own scratch) and whatever else under
        ``prefix_uri`` is older than ``sweep_grace_s`` (left by killed runs; a run in flight
        writes younger files). Age is judged by the store's clock: against the newest object
        listed. Returns how many objects were deleted."""
        listed = self.list(prefix_uri)
        stamps = [t for t in (_parse_iso(o.modified) for o in listed) if t is not None]
        if not stamps:
            return 0
        old = max(stamps) - self.sweep_grace_s
        own_prefix = own.rstrip("/") + "/" if own else None
        doomed = [o.uri for o in listed if (own_prefix and o.uri.startswith(own_prefix))
                  or (_parse_iso(o.modified) or old + 1) <= old]
        return self.delete(doomed)

    # ----------------------------------------------------------------- parquet
    def write_parquet(self, table: pa.Table, uri: str, *, compression: str = "zstd", row_group_size: int | None = None,
                      use_dictionary: bool | list[str] = True) -> int:
        """Write one Parquet file (row groups of ``row_group_size`` rows, default one per
        ~1M rows; dictionary encoding for ``use_dictionary``: all columns, none, or those
        named); returns its row count."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=compression, row_group_size=row_group_size, use_dictionary=use_dictionary)
        self.write_bytes(uri, buf.getvalue())
        return table.num_rows

    def read_parquet(self, uris: str | Iterable[str], *, columns: list[str] | None = None, filters=None) -> pa.Table:
        """Read and concatenate Parquet files (one URI or several); ``filters`` (a
        ``pyarrow.compute`` expression) keeps only matching rows while reading."""
        if isinstance(uris, str):
            uris = [uris]
        tables = []
        for uri in uris:
            fs, path = self.filesystem(uri)
            try:
                tables.append(pq.read_table(path, filesystem=fs, columns=columns, filters=filters))
            except FileNotFoundError:
                raise StorageError(f"Parquet file not found: {uri}") from None
            except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
                raise CorruptFileError(uri, f"{type(exc).__name__}: {exc}") from None
        if not tables:
            raise StorageError("read_parquet called with no files")
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

    def read_row_groups(self, uri: str, groups: Iterable[int] | None = None, *,
                        columns: list[str] | None = None) -> Iterator[tuple[int, pa.Table]]:
        """``(row group number, rows)`` of a Parquet file, one row group at a time (all of them
        when ``groups`` is None): a reader holds one group, never the file."""
        with self.open_input(uri) as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups) if groups is None else groups:
                yield g, pf.read_row_group(g, columns=columns)

    def iter_parquet_batches(self, uri: str, *, columns: list[str] | None = None,
                             batch_size: int = 16) -> Iterator[pa.RecordBatch]:
        """A Parquet file's rows in record batches of ``batch_size`` rows (bounded memory)."""
        with self.open_input(uri) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)

    # ----------------------------------------------------------------- publish-by-commit
    def staging_uri(self, dataset_uri: str, run_id: str) -> str:
        """Where a run's tasks write part files for ``dataset_uri`` (invisible until published)."""
        return join(dataset_uri, "data", safe_key(run_id))

    def published(self, dataset_uri: str) -> dict | None:
        """The current pointer of a dataset, or None if it was never published."""
        return self._read_pointer(dataset_uri)[0]

    def generation(self, dataset_uri: str) -> int:
        """The published generation of a dataset (0 when never published)."""
        return pointer_generation(self.published(dataset_uri))

    def published_files(self, dataset_uri: str) -> list[str]:
        pointer = self.published(dataset_uri)
        if pointer is None:
            raise StorageError(f"dataset has never been published: {dataset_uri}")
        return [join(dataset_uri, f) for f in pointer["files"]]

    def read_dataset(self, dataset_uri: str, *, columns: list[str] | None = None, schema: pa.Schema | None = None,
                     filters=None) -> pa.Table:
        """Read the published version of a dataset (empty table with ``schema`` if no files);
        ``filters`` as in :meth:`read_parquet`. A reader whose version was swept while it read
        (it opened the pointer three publishes ago) re-reads the pointer and tries again."""
        for attempt in range(4):
            files = self.published_files(dataset_uri)
            if not files:
                if schema is None:
                    raise StorageError(f"dataset {dataset_uri} is published with no files and no schema was given")
                return schema.empty_table() if columns is None else schema.empty_table().select(columns)
            try:
                return self.read_parquet(files, columns=columns, filters=filters)
            except StorageError:
                if attempt == 3 or self.published_files(dataset_uri) == files:
                    raise
        raise AssertionError("unreachable")

    def read_published(self, dataset_uri: str, *, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """The published version of a dataset, or an empty ``schema`` table if it never was
        (a stage's first run)."""
        if self.published(dataset_uri) is None:
            empty = schema.empty_table()
            return empty if columns is None else empty.select(columns)
        return self.read_dataset(dataset_uri, columns=columns, schema=schema)

    def publish(self, dataset_uri: str, *, run_id: str, files: list[str], meta: dict | None = None,
                keep_versions: int = 2, expected_generation: int | None = None) -> dict:
        """Make ``files`` (URIs under the dataset) the dataset's current version in one write.

        ``expected_generation`` is the generation the caller built this version on (0: it saw
        no version); when the dataset has moved on, :class:`~deepcontent.errors.PublishConflict`
        is raised and nothing is written. Without it the publish goes on top of whatever is
        current (for datasets re-derived whole, where the last writer may win). Of concurrent
        publishers exactly one writes each generation. Afterwards versions beyond
        ``keep_versions`` and unreferenced files older than the grace period are swept (a
        reader that opened the previous pointer keeps working)."""
        rel = sorted(relative_key(dataset_uri, f) for f in files)
        body = {"run_id": run_id, "files": rel, **(meta or {})}
        with self._publish_lock(dataset_uri) as conditional:
            for _ in range(50):
                current, etag = self._read_pointer(dataset_uri)
                gen = pointer_generation(current)
                if expected_generation is not None and gen != expected_generation:
                    raise PublishConflict(
                        f"{dataset_uri} is at generation {gen} (run {current.get('run_id') if current else None}), "
                        f"but run {run_id} built its version on generation {expected_generation}: another run "
                        f"published it meanwhile; nothing was published (re-run to build on the current version)")
                pointer = {**body, "generation": gen + 1,
                           "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                if self._write_pointer(dataset_uri, pointer, etag=etag if conditional else None,
                                       create=conditional and current is None):
                    break
                time.sleep(0.01 + 0.05 * (uuid.uuid4().int % 100) / 100)  # lost a conditional write
            else:
                raise PublishConflict(f"{dataset_uri}: kept losing the pointer write to other publishers (run {run_id})")
            self.write_json(join(dataset_uri, "_history", f"{gen + 1:012d}-{safe_key(run_id)}.json"), pointer)
        self._sweep(dataset_uri, keep_versions)
        return pointer

    # -- pointer I/O
    def _read_pointer(self, dataset_uri: str) -> tuple[dict | None, str | None]:
        """``(pointer or None, its ETag or None)``."""
        uri = join(dataset_uri, POINTER)
        scheme, path = split_uri(uri)
        if scheme == "file":
            try:
                with open(path, "rb") as f:
                    return json.loads(f.read()), None
            except FileNotFoundError:
                return None, None
        bucket, _, key = path.partition("/")
        try:
            obj = self.boto_client().get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404 or "NoSuchKey" in str(exc) or "NoSuchBucket" in str(exc):
                return None, None
            raise StorageError(f"cannot read {uri}: {exc}") from None
        return json.loads(obj["Body"].read()), (obj.get("ETag") or "").strip('"') or None

    def _write_pointer(self, dataset_uri: str, pointer: dict, *, etag: str | None, create: bool) -> bool:
        """Write the pointer; with ``etag``/``create`` only if it is still the version read
        (False when another writer got there first)."""
        uri = join(dataset_uri, POINTER)
        data = json.dumps(pointer, indent=2, sort_keys=True, default=str).encode()
        if etag is None and not create:
            self.write_bytes(uri, data)
            return True
        bucket, _, key = split_uri(uri)[1].partition("/")
        cond = {"IfNoneMatch": "*"} if create else {"IfMatch": f'"{etag}"'}
        try:
            self.boto_client().put_object(Bucket=bucket, Key=key, Body=data, **cond)
        except Exception as exc:
            if _status(exc) in (409, 412):
                return False
            raise StorageError(f"cannot write {uri}: {exc}") from None
        return True

    # -- one writer at a time
    @contextmanager
    def _publish_lock(self, dataset_uri: str) -> Iterator[bool]:
        """Hold the dataset's publish lock; yields True when the store's conditional writes
        make a lock unnecessary."""
        scheme, path = split_uri(dataset_uri)
        if scheme == "file":
            import fcntl

            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, LOCK), "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield False
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return
        if self.conditional_writes():
            yield True
            return
        with self._lease(join(dataset_uri, LOCK)):
            yield False

    def conditional_writes(self) -> bool:
        """Whether this S3 endpoint honours ``If-None-Match`` on PUT (probed once per process
        and endpoint by creating one object twice)."""
        key = ("conditional", self.endpoint_url, self.root.split("/")[2] if self.root.startswith("s3://") else "")
        if key not in _PROBES:
            probe = self.uri("_probe", f"conditional-{uuid.uuid4().hex}")
            bucket, _, k = split_uri(probe)[1].partition("/")
            client = self.boto_client()
            self.ensure_root()
            try:
                client.put_object(Bucket=bucket, Key=k, Body=b"1", IfNoneMatch="*")
                try:
                    client.put_object(Bucket=bucket, Key=k, Body=b"2", IfNoneMatch="*")
                    _PROBES[key] = False  # the second create went through: conditions ignored
                except Exception as exc:
                    _PROBES[key] = _status(exc) in (409, 412)
            except Exception:
                _PROBES[key] = False
            finally:
                try:
                    client.delete_object(Bucket=bucket, Key=k)
                except Exception:
                    pass
        return _PROBES[key]

    @contextmanager
    def _lease(self, lock_uri: str, *, timeout_s: float = 600.0) -> Iterator[None]:
        """A lease lock on a store without conditional writes: write a token, wait
        ``lock_settle_s``, read it back; ours only if our token is still there. A lock older
        than ``lock_lease_s`` (by the server's clock) belongs to a dead writer and is broken."""
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        bucket, _, key = split_uri(lock_uri)[1].partition("/")
        client = self.boto_client()
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise StorageError(f"could not take the publish lock {lock_uri} within {timeout_s:.0f}s")
            try:
                head = client.head_object(Bucket=bucket, Key=key)
                age = _server_age_s(head)
                if age is not None and age > self.lock_lease_s:
                    log_storage.warning("breaking the publish lock %s, %.0fs old (a writer died holding it)", lock_uri, age)
                    client.delete_object(Bucket=bucket, Key=key)
                    continue
                time.sleep(0.02 + 0.08 * (uuid.uuid4().int % 100) / 100)
                continue
            except Exception as exc:
                if _status(exc) != 404:
                    raise StorageError(f"cannot read the publish lock {lock_uri}: {exc}") from None
            client.put_object(Bucket=bucket, Key=key, Body=token.encode())
            time.sleep(self.lock_settle_s)
            try:
                held = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode() == token
            except Exception:
                held = False
            if held:
                break
        try:
            yield
        finally:
            try:
                if client.get_object(Bucket=bucket, Key=key)["Body"].read().decode() == token:
                    client.delete_object(Bucket=bucket, Key=key)
            except Exception:
                pass

    # -- sweep
    def rollback(self, dataset_uri: str, *, run_id: str) -> dict:
        """Publish the newest earlier version of a dataset whose files all still read, as a new
        generation (the repair for a corrupt part: the stage that owns the dataset then rebuilds
        what the rolled-back version lacks on its next run). Raises StorageError when there is
        no readable earlier version."""
        current = self.published(dataset_uri)
        if current is None:
            raise StorageError(f"{dataset_uri} has never been published: nothing to roll back")
        entries = []
        for o in self.list(join(dataset_uri, "_history")):
            gen = posix_basename(o.uri).split("-", 1)[0]
            if gen.isdigit() and len(gen) == 12 and int(gen) < pointer_generation(current):
                entries.append((int(gen), o.uri))
        for gen, uri in sorted(entries, reverse=True):
            try:
                pointer = self.read_json(uri)
                files = [join(dataset_uri, f) for f in pointer["files"]]
                for f in files:
                    if f.endswith(".parquet"):
                        pq.read_metadata(self.filesystem(f)[1], filesystem=self.filesystem(f)[0])
                    elif not self.exists(f):
                        raise StorageError(f"missing {f}")
            except (StorageError, ValueError, KeyError, OSError, pa.ArrowException):
                continue
            meta = {k: v for k, v in pointer.items() if k not in ("run_id", "files", "generation", "published_at")}
            return self.publish(dataset_uri, run_id=run_id, files=files,
                                meta={**meta, "rolled_back_to": pointer.get("run_id"), "rolled_back_from": current.get("run_id")},
                                expected_generation=pointer_generation(current))
        raise StorageError(f"{dataset_uri}: no earlier version whose files all read (kept versions are "
                           f"storage history entries; a stage re-run rebuilds the dataset instead)")

    def _sweep(self, dataset_uri: str, keep_versions: int) -> None:
        """Delete data files no kept version references, once older than the grace period
        (files of older runs that a cumulative dataset still points at survive; staged parts of
        a run in flight are younger than the grace period; orphans of crashed runs go)."""
        history = []
        for o in self.list(join(dataset_uri, "_history")):
            name = posix_basename(o.uri)
            gen = name.split("-", 1)[0]
            if ".tmp-" in name or not name.endswith(".json") or not gen.isdigit():
                continue  # a temp file of a writer in flight, or something not ours
            # Generation-named entries (12 digits) sort after the old millisecond-named ones.
            history.append(((len(gen) == 12, int(gen)), o.uri))
        history.sort()
        keep: set[str] = set()
        current = self.published(dataset_uri)
        live = [current] if current else []
        for _, uri in history[-keep_versions:]:
            try:
                live.append(self.read_json(uri))
            except (StorageError, ValueError):
                continue
        for pointer in live:
            keep.update(join(dataset_uri, f) for f in pointer.get("files", []))
        if current is None:
            return
        # "Now" by the store's clock: the newest of what it lists (the history entry just
        # written is among them) and the pointer; a publisher's own clock plays no part.
        data = self.list(join(dataset_uri, "data"))
        stamps = [_parse_iso(o.modified) for o in data] + [_parse_iso(self.info(join(dataset_uri, POINTER)).modified)]
        stamps += [_parse_iso(o.modified) for o in self.list(join(dataset_uri, "_history"))]
        stamps = [t for t in stamps if t is not None]
        if not stamps:
            return
        now = max(stamps)
        old = now - self.sweep_grace_s
        stale = [o.uri for o in data if o.uri not in keep and (_parse_iso(o.modified) or now) <= old]
        self.delete(stale)
        self.delete(uri for _, uri in history[:-keep_versions])

    def read_line_range(self, uri: str, start: int, end: int, *, probe: int = 1 << 16) -> tuple[int, bytes]:
        """The whole lines whose first byte lies in ``[start, end)`` of a line-oriented object.

        Returns ``(offset of the first returned byte, bytes)``. Splitting an object into
        consecutive ranges and calling this on each yields every line exactly once, so tasks
        can parse one large file in parallel."""
        with self.open_input(uri) as f:
            size = f.size()

            def next_newline(pos: int) -> int:
                # position just past the first newline at or after pos (size if none)
                found = _find_newline(f, pos, size, probe)
                return size if found is None else found

            begin = 0 if start == 0 else next_newline(start - 1)
            if begin >= min(end, size):
                return begin, b""
            stop = next_newline(end - 1)
            return begin, f.read_at(stop - begin, begin)

    def read_line_segments(self, uri: str, start: int, end: int, *, max_line_bytes: int,
                           probe: int = 1 << 16) -> tuple[list[tuple[int, bytes]], list[int]]:
        """Like :meth:`read_line_range`, but never holding more than the range plus
        ``max_line_bytes``: returns ``(segments, too_long)``, where ``segments`` are
        ``(offset, bytes)`` runs of whole lines (newline included) and ``too_long`` the offsets of
        lines longer than ``max_line_bytes`` (left out, so a caller can quarantine them).

        Consecutive ranges still see every line exactly once: a line belongs to the range its
        first byte lies in, and a range that holds no line start (it lies inside one giant line)
        is answered without reading past its end."""
        with self.open_input(uri) as f:
            size = f.size()
            stop_at = min(end, size)

            def find_newline(pos: int, limit: int) -> int | None:
                return _find_newline(f, pos, limit, probe)

            if start == 0:
                begin = 0
            else:
                found = find_newline(start - 1, stop_at)
                if found is None:  # no line starts in this range
                    return [], []
                begin = found
            if begin >= stop_at:
                return [], []
            data = f.read_at(stop_at - begin, begin)
            segments: list[tuple[int, bytes]] = []
            too_long: list[int] = []
            seg_start, pos = 0, 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                if nl < 0:  # the last line runs past the range: finish it, up to the cap
                    line_start = begin + pos
                    budget_end = min(size, line_start + max_line_bytes + 1)
                    tail_end = find_newline(stop_at, budget_end) if stop_at < size else None
                    if tail_end is not None:
                        line_len = tail_end - line_start - 1
                    elif stop_at >= size or budget_end >= size:
                        tail_end, line_len = size, size - line_start  # the object's last line, no newline
                    else:
                        line_len = max_line_bytes + 1  # no newline within the cap
                    if line_len > max_line_bytes:
                        too_long.append(line_start)
                        if pos > seg_start:
                            segments.append((begin + seg_start, data[seg_start:pos]))
                    else:
                        rest = f.read_at(tail_end - stop_at, stop_at) if tail_end > stop_at else b""
                        segments.append((begin + seg_start, data[seg_start:] + rest))
                    seg_start = len(data)
                    break
                if nl - pos > max_line_bytes:
                    if pos > seg_start:
                        segments.append((begin + seg_start, data[seg_start:pos]))
                    too_long.append(begin + pos)
                    seg_start = nl + 1
                pos = nl + 1
            if seg_start < len(data):
                segments.append((begin + seg_start, data[seg_start:]))
            return segments, too_long

    def iter_lines(self, uri: str, *, block: int = 8 << 20) -> Iterator[bytes]:
        """Stream an object's lines (without newline) in bounded memory."""
        with self.open_input(uri) as f:
            rest = b""
            while True:
                data = f.read(block)
                if not data:
                    break
                data = rest + data
                lines = data.split(b"\n")
                rest = lines.pop()
                yield from lines
            if rest:
                yield rest


def _find_newline(f, pos: int, limit: int, probe: int) -> int | None:
    """Position just past the first newline in ``[pos, limit)`` of an open file, read in
    ``probe``-byte steps (bounded memory), or None when there is none."""
    while pos < limit:
        buf = f.read_at(min(probe, limit - pos), pos)
        if not buf:
            break
        i = buf.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(buf)
    return None


def pointer_generation(pointer: dict | None) -> int:
    """A pointer's generation (0 for none; 1 for a pointer written before generations)."""
    if pointer is None:
        return 0
    return int(pointer.get("generation", 1))


_PROBES: dict[tuple, bool] = {}
log_storage = logging.getLogger("deepcontent.storage")


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore error (None for anything else)."""
    resp = getattr(exc, "response", None) or {}
    code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code is None and resp.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
        return 404
    return int(code) if code is not None else None


def _iso_ns(mtime_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(mtime_ns // 10**9)) + f".{mtime_ns % 10**9:09d}Z"


def _parse_iso(text: str | None) -> float | None:
    """Seconds since the epoch of an ISO-8601 time (``...Z``, ``+00:00``, nanoseconds)."""
    if not text:
        return None
    from datetime import datetime, timezone

    t = text.replace("Z", "+00:00")
    frac = 0.0
    if "." in t:
        head, _, rest = t.partition(".")
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
        tz = rest[len(digits):]
        frac = float("0." + digits) if digits else 0.0
        t = head + tz
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp() + frac


def _server_age_s(head: dict) -> float | None:
    """How old an object is by the server's own clock (its Date header minus LastModified)."""
    from email.utils import parsedate_to_datetime

    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date or not head.get("LastModified"):
        return None
    return (parsedate_to_datetime(date) - head["LastModified"]).total_seconds()


def new_run_id(stage: str) -> str:
    """Sortable, unique run id: ``<stage>-YYYYmmddTHHMMSS-<8 hex>``."""
    return f"{stage}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def posix_basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))
