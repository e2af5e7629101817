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
therefore never leaves half an output visible, and its orphaned files are swept by the next
successful publish of the same dataset.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import posixpath
import time
import uuid
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

from deepcontent.errors import StorageError, UnsafeKeyError  # noqa: E402

if TYPE_CHECKING:
    from deepcontent.config import StorageConfig

POINTER = "_published.json"


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
    """Explicit config secret > credentials file > ``AWS_*`` environment > None (SDK default chain)."""
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
    ) -> None:
        split_uri(root)  # validate early, with the URI in the message
        self.root = root.rstrip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self._credentials = credentials
        self._pafs: pafs.FileSystem | None = None
        self._local: pafs.FileSystem | None = None
        self._boto = None

    @classmethod
    def from_config(cls, cfg: "StorageConfig") -> "Storage":
        return cls(cfg.root, endpoint_url=cfg.endpoint_url, region=cfg.region, credentials=resolve_credentials(cfg))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pafs"] = state["_local"] = state["_boto"] = None
        return state

    def __repr__(self) -> str:
        return f"Storage(root={self.root!r}, endpoint_url={self.endpoint_url!r})"

    def with_root(self, root: str) -> "Storage":
        """The same store (endpoint, region, credentials) under another root: another
        catalog's registry, another bucket."""
        return Storage(root, endpoint_url=self.endpoint_url, region=self.region, credentials=self._credentials)

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
        """URI of a key (or joined keys) under the root."""
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
                    st = os.stat(full)
                    modified = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(st.st_mtime)) + f".{st.st_mtime_ns % 10**9:09d}Z"
                    out.append(ObjectInfo("file://" + full, st.st_size, modified))
        else:
            bucket, _, key_prefix = path.partition("/")
            if key_prefix and not key_prefix.endswith("/"):
                key_prefix += "/"
            paginator = self.boto_client().get_paginator("list_objects_v2")
            try:
                for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
                    for obj in page.get("Contents", []):
                        modified = obj["LastModified"].isoformat() if obj.get("LastModified") else None
                        out.append(ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), modified))
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

    # ----------------------------------------------------------------- parquet
    def write_parquet(self, table: pa.Table, uri: str, *, compression: str = "zstd", row_group_size: int | None = None) -> int:
        """Write one Parquet file (row groups of ``row_group_size`` rows, default one per
        ~1M rows); returns its row count."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=compression, row_group_size=row_group_size)
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
        uri = join(dataset_uri, POINTER)
        if not self.exists(uri):
            return None
        return self.read_json(uri)

    def published_files(self, dataset_uri: str) -> list[str]:
        pointer = self.published(dataset_uri)
        if pointer is None:
            raise StorageError(f"dataset has never been published: {dataset_uri}")
        return [join(dataset_uri, f) for f in pointer["files"]]

    def read_dataset(self, dataset_uri: str, *, columns: list[str] | None = None, schema: pa.Schema | None = None,
                     filters=None) -> pa.Table:
        """Read the published version of a dataset (empty table with ``schema`` if no files);
        ``filters`` as in :meth:`read_parquet`."""
        files = self.published_files(dataset_uri)
        if not files:
            if schema is None:
                raise StorageError(f"dataset {dataset_uri} is published with no files and no schema was given")
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return self.read_parquet(files, columns=columns, filters=filters)

    def read_published(self, dataset_uri: str, *, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
        """The published version of a dataset, or an empty ``schema`` table if it never was
        (a stage's first run)."""
        if self.published(dataset_uri) is None:
            empty = schema.empty_table()
            return empty if columns is None else empty.select(columns)
        return self.read_dataset(dataset_uri, columns=columns, schema=schema)

    def publish(self, dataset_uri: str, *, run_id: str, files: list[str], meta: dict | None = None, keep_versions: int = 2) -> dict:
        """Make ``files`` (URIs under the dataset) the dataset's current version in one write.

        Older versions beyond ``keep_versions`` and files of runs that never published are
        deleted afterwards (a reader that opened the previous pointer keeps working)."""
        rel = sorted(relative_key(dataset_uri, f) for f in files)
        pointer = {
            "run_id": run_id,
            "files": rel,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **(meta or {}),
        }
        history_uri = join(dataset_uri, "_history", f"{int(time.time() * 1000):015d}-{safe_key(run_id)}.json")
        self.write_json(history_uri, pointer)
        self.write_json(join(dataset_uri, POINTER), pointer)
        self._sweep(dataset_uri, keep_versions)
        return pointer

    def _sweep(self, dataset_uri: str, keep_versions: int) -> None:
        """Delete data files no kept version references (files of older runs that a cumulative
        dataset still points at survive; orphans of runs that never published do not)."""
        history = sorted(o.uri for o in self.list(join(dataset_uri, "_history")))
        keep = set()
        for uri in history[-keep_versions:]:
            keep.update(join(dataset_uri, f) for f in self.read_json(uri)["files"])
        self.delete(o.uri for o in self.list(join(dataset_uri, "data")) if o.uri not in keep)
        self.delete(history[:-keep_versions])

    def read_line_range(self, uri: str, start: int, end: int, *, probe: int = 1 << 16) -> tuple[int, bytes]:
        """The whole lines whose first byte lies in ``[start, end)`` of a line-oriented object.

        Returns ``(offset of the first returned byte, bytes)``. Splitting an object into
        consecutive ranges and calling this on each yields every line exactly once, so tasks
        can parse one large file in parallel."""
        with self.open_input(uri) as f:
            size = f.size()

            def next_newline(pos: int) -> int:
                # position just past the first newline at or after pos (size if none)
                while pos < size:
                    buf = f.read_at(min(probe, size - pos), pos)
                    i = buf.find(b"\n")
                    if i >= 0:
                        return pos + i + 1
                    pos += len(buf)
                return size

            begin = 0 if start == 0 else next_newline(start - 1)
            if begin >= min(end, size):
                return begin, b""
            stop = next_newline(end - 1)
            return begin, f.read_at(stop - begin, begin)

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


def new_run_id(stage: str) -> str:
    """Sortable, unique run id: ``<stage>-YYYYmmddTHHMMSS-<8 hex>``."""
    return f"{stage}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def posix_basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))
