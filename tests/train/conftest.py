"""A local Ray session and a small generated catalog (audio -> spectrograms -> factors) shared by
the train-stage tests of a module."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

import pytest

from support import config_for
from deepcontent.storage import Storage

# Set before Ray starts, so the raylet and every worker inherit them. Ray Train's controller
# polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and a worker's
# report blocks until the previous one was polled, so sub-second test epochs would each wait
# for a poll; a faster poll also notices the killed worker sooner.
RAY_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def ray_local():
    """``init_ray`` on this machine with its temp dir under /tmp (Ray's socket paths must stay
    short), shut down and removed after the module."""
    import ray

    from deepcontent.config import RayConfig
    from deepcontent.engines.ray import init_ray

    assert not ray.is_initialized(), "another test left Ray running"
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_TMPDIR")}
    os.environ.update(RAY_ENV, RAY_TMPDIR=tmp)
    init_ray(RayConfig(num_cpus=4))
    try:
        yield ray
    finally:
        from deepcontent.engines.ray import shutdown_ray

        shutdown_ray()  # bounded: Ray's disconnect can hang (see shutdown_ray)
        shutil.rmtree(tmp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: Small but real: 1,000 songs of 5 s through the whole pipeline, 16 WMF factors. Fewer songs
#: leave too few train examples per genre for either model to beat predicting the mean by
#: much (at 160 songs both score ~0.93-0.96, within noise of each other).
CATALOG = {
    "synth.songs": 1000, "synth.users": 8000, "synth.clip_seconds": 5.0, "synth.gtzan_per_genre": 0,
    "synth.mtat_clips": 0, "synth.mismatch_fraction": 0.0, "synth.lastfm_format": "none", "synth.audio_format": "wav",
    "spectrograms.clips_per_task": 40, "matrices.split_fractions": "[0.7,0.2,0.1]",
    "factorize.factors": 16, "factorize.num_threads": 1,
}


@pytest.fixture(scope="module")
def catalog(s3_server, spark, tmp_path_factory):
    """``(cfg, storage)`` of a fresh bucket holding a generated catalog run through ingest,
    spectrograms, matrices and factorize."""
    from support import run_stage
    from deepcontent.synth.generate import generate

    storage = Storage(f"s3://t-{uuid.uuid4().hex[:12]}/root", endpoint_url=s3_server.endpoint_url,
                      credentials=s3_server.credentials)
    storage.ensure_root()
    cfg = config_for(storage, tmp_path_factory.mktemp("train"), **CATALOG)
    generate(cfg, storage)
    run_stage("ingest", cfg, storage, spark)
    run_stage("spectrograms", cfg, storage, spark)
    run_stage("matrices", cfg, storage, spark)
    run_stage("factorize", cfg, storage)
    return cfg, storage
