"""Shared fixtures: a real S3 server (rclone serve s3) for the session, a fresh bucket per test,
a local Spark session, and configs pointing at them."""

from __future__ import annotations

import os
import uuid

import pytest

from deepcontent.engines.s3server import EmbeddedS3Server
from deepcontent.storage import Storage

# Spark's Python workers must import test-only modules (the decoder fault injector) too; they
# inherit PYTHONPATH from the JVM, which inherits this process's environment.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TESTS, os.environ.get("PYTHONPATH")) if p)
# The fault injectors are test modules: hooks outside the package run only where the
# environment allows them (deepcontent.hooks), as an operator would allow their own.
os.environ["DEEPCONTENT_ALLOW_HOOKS"] = "spectro_faults,embed_faults,train_faults"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = EmbeddedS3Server(tmp_path_factory.mktemp("s3"), log_file=str(tmp_path_factory.mktemp("s3log") / "rclone.log"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_storage(s3_server) -> Storage:
    """A fresh, empty bucket on the session's S3 server."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    storage = Storage(f"s3://{bucket}/root", endpoint_url=s3_server.endpoint_url, credentials=s3_server.credentials)
    storage.ensure_root()
    return storage


@pytest.fixture
def file_storage(tmp_path) -> Storage:
    storage = Storage(f"file://{tmp_path}/store")
    storage.ensure_root()
    return storage


@pytest.fixture(params=["file", "s3"])
def any_storage(request):
    """Both storage backends: every contract test runs against each."""
    return request.getfixturevalue("file_storage" if request.param == "file" else "s3_storage")


@pytest.fixture(scope="session")
def spark():
    from deepcontent.config import SparkConfig
    from deepcontent.engines.spark import spark_session

    session = spark_session(SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="2g",
                                        conf={"spark.ui.enabled": "false"}))
    yield session
    session.stop()


@pytest.fixture
def torch_one_thread():
    """One torch intra-op thread for the test: the suite shares a 2-core machine, and one
    thread also keeps results reproducible."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
