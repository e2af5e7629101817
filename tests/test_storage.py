import numpy as np
import pyarrow as pa
import pytest

from deepcontent.engines.s3server import EmbeddedS3Server
from deepcontent.storage import Storage, StorageError, UnsafeKeyError, join, resolve_credentials, safe_key
from deepcontent.config import StorageConfig


@pytest.mark.parametrize("key", ["../etc/passwd", "a/../../b", "/abs/path", "a\x00b", "a\\b", "./a", "a/./b"])
def test_keys_that_could_escape_the_root_are_rejected_with_the_key(key):
    with pytest.raises(UnsafeKeyError) as err:
        safe_key(key)
    assert repr(key)[1:-1] in str(err.value) or key in str(err.value)
    with pytest.raises(UnsafeKeyError):
        join("file:///tmp/root", key)


def test_safe_keys_are_normalised():
    assert safe_key("a//b/c/") == "a/b/c"
    assert join("s3://bucket/pre/", "x/y", "z.txt") == "s3://bucket/pre/x/y/z.txt"


def test_bytes_listing_and_ranges_round_trip(any_storage):
    st = any_storage
    st.write_bytes(st.uri("a/one.txt"), b"hello world")
    st.write_bytes(st.uri("a/b/two.bin"), bytes(range(256)) * 10)
    assert st.read_bytes(st.uri("a/one.txt")) == b"hello world"
    assert st.read_range(st.uri("a/one.txt"), 6, 100) == b"world"
    assert st.size(st.uri("a/b/two.bin")) == 2560
    listed = st.list(st.uri("a"))
    assert [o.uri for o in listed] == [st.uri("a/b/two.bin"), st.uri("a/one.txt")]
    assert st.list(st.uri("missing")) == []
    with pytest.raises(StorageError, match="not found"):
        st.read_bytes(st.uri("a/nope"))


def test_parquet_round_trip(any_storage):
    table = pa.table({"x": np.arange(1000), "s": [f"v{i}" for i in range(1000)]})
    any_storage.write_parquet(table, any_storage.uri("t/part.parquet"))
    assert any_storage.read_parquet(any_storage.uri("t/part.parquet")).equals(table)
    import pyarrow.compute as pc

    some = any_storage.read_parquet(any_storage.uri("t/part.parquet"), filters=pc.field("s").isin(["v3", "v999"]))
    assert some.to_pydict() == {"x": [3, 999], "s": ["v3", "v999"]}


def test_unpublished_staging_is_invisible_and_publish_switches_atomically(any_storage):
    st = any_storage
    ds = st.uri("canonical/things")
    assert st.published(ds) is None
    v1 = join(st.staging_uri(ds, "run-1"), "part-0.parquet")
    st.write_parquet(pa.table({"x": [1, 2]}), v1)
    with pytest.raises(StorageError, match="never been published"):
        st.read_dataset(ds)
    st.publish(ds, run_id="run-1", files=[v1])
    assert st.read_dataset(ds)["x"].to_pylist() == [1, 2]
    # A run that writes parts but dies before publishing changes nothing for readers.
    crashed = join(st.staging_uri(ds, "run-2"), "part-0.parquet")
    st.write_parquet(pa.table({"x": [99]}), crashed)
    assert st.read_dataset(ds)["x"].to_pylist() == [1, 2]
    v3 = join(st.staging_uri(ds, "run-3"), "part-0.parquet")
    st.write_parquet(pa.table({"x": [3]}), v3)
    st.sweep_grace_s = 0.0  # the orphan is older than the grace period (a run in flight would not be)
    st.publish(ds, run_id="run-3", files=[v3])
    assert st.read_dataset(ds)["x"].to_pylist() == [3]
    # the crashed run's orphan is swept; the previous version is kept for in-flight readers
    remaining = {o.uri for o in st.list(join(ds, "data"))}
    assert crashed not in remaining and v1 in remaining and v3 in remaining


@pytest.mark.parametrize("chunk", [3, 7, 64, 1000, 10**6])
def test_line_ranges_cover_every_line_exactly_once(any_storage, chunk):
    rng = np.random.default_rng(chunk)
    lines = [b"x" * int(n) for n in rng.integers(0, 40, size=300)]
    data = b"\n".join(lines) + (b"\n" if chunk % 2 else b"")  # with and without final newline
    uri = any_storage.uri("lines.txt")
    any_storage.write_bytes(uri, data)
    got, offsets = [], []
    for start in range(0, len(data), chunk):
        off, part = any_storage.read_line_range(uri, start, min(start + chunk, len(data)), probe=5)
        if part:
            offsets.append(off)
            got.extend(part.split(b"\n")[:-1] if part.endswith(b"\n") else part.split(b"\n"))
    assert got == lines
    assert offsets == sorted(offsets)


def test_boto3_and_pyarrow_see_the_same_objects(s3_storage):
    s3_storage.write_bytes(s3_storage.uri("k/obj"), b"via pyarrow")
    client = s3_storage.boto_client()
    bucket, _, prefix = s3_storage.root[len("s3://"):].partition("/")
    client.put_object(Bucket=bucket, Key=f"{prefix}/k/boto", Body=b"via boto3")
    assert client.get_object(Bucket=bucket, Key=f"{prefix}/k/obj")["Body"].read() == b"via pyarrow"
    assert s3_storage.read_bytes(s3_storage.uri("k/boto")) == b"via boto3"
    # large enough to go multipart through pyarrow's output stream
    big = np.random.default_rng(0).bytes(12 << 20)
    with s3_storage.open_output(s3_storage.uri("k/big")) as f:
        f.write(big)
    assert client.head_object(Bucket=bucket, Key=f"{prefix}/k/big")["ContentLength"] == len(big)


def test_server_rejects_wrong_credentials(s3_server):
    from deepcontent.storage import Credentials

    good = Storage("s3://auth-check", endpoint_url=s3_server.endpoint_url, credentials=s3_server.credentials)
    good.ensure_root()
    good.write_bytes(good.uri("x"), b"1")
    bad = Storage("s3://auth-check", endpoint_url=s3_server.endpoint_url, credentials=Credentials("nobody", "wrong"))
    with pytest.raises(StorageError) as err:
        bad.read_bytes(bad.uri("x"))
    assert "wrong" not in str(err.value)


def test_unpickled_copies_share_one_client_per_identity(s3_server):
    """Tasks unpickle a fresh Storage each time; they must not each build a new S3 client."""
    import pickle

    from deepcontent.storage import Credentials

    a = Storage("s3://share-check", endpoint_url=s3_server.endpoint_url, credentials=s3_server.credentials)
    b = pickle.loads(pickle.dumps(a))
    assert b._pafs is None  # clients never travel in the pickle
    assert b._s3fs() is a._s3fs() and b.boto_client() is a.boto_client()
    other = Storage("s3://share-check", endpoint_url=s3_server.endpoint_url, credentials=Credentials("someone", "else"))
    assert other._s3fs() is not a._s3fs() and other.boto_client() is not a.boto_client()


def test_server_starts_and_stops_cleanly(tmp_path):
    server = EmbeddedS3Server(tmp_path / "data")
    with server:
        assert server.running
        st = Storage("s3://bucket-one", endpoint_url=server.endpoint_url, credentials=server.credentials)
        st.ensure_root()
        st.write_bytes(st.uri("f.txt"), b"on disk")
        # its own CPU time grows with the work it serves; benchmarks charge it with this
        assert server.pid is not None
        before = server.cpu_seconds()
        for _ in range(500):
            st.read_bytes(st.uri("f.txt"))
        assert server.cpu_seconds() > before >= 0.0
    assert not server.running
    assert server.pid is None and server.cpu_seconds() == 0.0
    assert (tmp_path / "data" / "bucket-one" / "f.txt").read_bytes() == b"on disk"


def test_credentials_come_from_a_file_outside_the_repo_and_never_print(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    cred = tmp_path / "credentials"
    cred.write_text("[ci]\naws_access_key_id = AKIAFILE\naws_secret_access_key = FILESECRET\n")
    c = resolve_credentials(StorageConfig(credentials_file=str(cred), credentials_profile="ci"))
    assert (c.access_key_id, c.secret_access_key) == ("AKIAFILE", "FILESECRET")
    assert "FILESECRET" not in repr(c)
    st = Storage("s3://b", credentials=c)
    assert "FILESECRET" not in repr(st)
    with pytest.raises(StorageError, match=r"no \[other\] profile"):
        resolve_credentials(StorageConfig(credentials_file=str(cred), credentials_profile="other"))


def test_a_killed_owner_leaves_no_server_behind(tmp_path):
    """SIGKILL runs no cleanup in the process that started the server (a CLI killed by a
    scheduler, the embed fault test); the server must go with it, not linger on its port."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time\n"
            "from deepcontent.engines.s3server import EmbeddedS3Server\n"
            f"s = EmbeddedS3Server({str(tmp_path / 'data')!r}).start()\n"
            "print(s.pid, flush=True)\n"
            "time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server_pid = int(owner.stdout.readline())
    os.kill(server_pid, 0)  # running
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{server_pid}/stat") as f:  # reaped by init once it exits: a zombie counts as gone
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.1)
    os.kill(server_pid, signal.SIGKILL)
    raise AssertionError(f"the S3 server (pid {server_pid}) outlived its killed owner")
