"""The train stage end to end on a generated catalog: Ray Train (2 CPU workers, DDP over gloo)
fed by Ray Data from the spectrogram shards in a real S3 server.

* the paper CNN learns the factors (validation NMSE < 1) and beats the BoW-MFCC + linear
  baseline on the same split;
* the model is registered (artifact, metadata, production pointer, manifest with the curve),
  loads back, reproduces its validation NMSE, and a re-run trains nothing;
* a worker SIGKILLed mid-run is replaced and the run resumes from the latest checkpoint.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepcontent.datasets import vectors as list_matrix
from deepcontent.registry import PRODUCTION, load_model, registered
from deepcontent.stages.train import load_training_data as build_targets
from deepcontent.train.loop import predict_clips
from support import run_stage


def run_train(cfg, storage):
    return run_stage("train", cfg, storage)


def _train_cfg(cfg, **train):
    out = cfg.model_copy(deep=True)
    for key, value in {"num_workers": 2, "batch_size": 32, "windows_per_clip": 4, **train}.items():
        setattr(out.train, key, value)
    return out


def _valid_nmse_of_registered_model(storage, version) -> float:
    """Score the registered model on the valid clips from scratch (driver side, no Ray)."""
    model, artifact = load_model(storage, version)
    data = build_targets(storage)
    spec = storage.read_parquet(data.spectrogram_files, columns=["track_id", "n_mels", "n_frames", "mel"])
    rows = {r["track_id"]: r for r in spec.to_pylist()}
    clips = [torch.from_numpy(np.frombuffer(rows[t]["mel"], np.float16).reshape(rows[t]["n_mels"], rows[t]["n_frames"]).copy())
             for t in data.valid["track_id"].to_pylist()]
    pred = predict_clips(model, [c.float() for c in clips], n_frames=artifact["window_frames"]).numpy()
    target = list_matrix(data.valid["target"])
    return float(np.mean((pred - target) ** 2) / target.var(axis=0).mean())


def test_paper_cnn_learns_the_factors_and_beats_the_bow_baseline(catalog, ray_local, s3_server):
    base_cfg, storage = catalog
    cfg = _train_cfg(base_cfg, epochs=20, patience=5, baseline=True)
    result = run_train(cfg, storage)
    m = result.metrics
    print(f"CNN valid NMSE {m['valid_nmse']:.4f} (epoch {m['best_epoch']} of {m['epochs_run']}), "
          f"BoW-MFCC + linear {m['baseline_valid_nmse']:.4f}")
    assert result.published and result.model_version.startswith("paper_cnn-")
    assert m["valid_nmse"] < 1.0, m
    assert m["valid_nmse"] < m["baseline_valid_nmse"], m

    meta = registered(storage, result.model_version)
    assert len(meta["curve"]) == m["epochs_run"] and meta["baseline"]["valid_nmse"] == m["baseline_valid_nmse"]
    assert meta["inputs"]["features/spectrograms"] and meta["inputs"]["code_version"]
    assert storage.read_json(storage.uri(PRODUCTION))["model_version"] == result.model_version
    manifest = storage.read_json(result.manifest_uri)
    assert manifest["status"] == "succeeded" and [h["epoch"] for h in manifest["curve"]] == list(range(m["epochs_run"]))
    assert manifest["metrics"]["valid_nmse"] == m["valid_nmse"]
    secret = s3_server.credentials.secret_access_key
    assert secret not in json.dumps(manifest) and secret not in json.dumps(meta)  # credentials reach workers, not records
    # Ray Train's checkpoints were persisted in the object store, under the version's run
    assert any(o.uri.endswith("/state.pt") for o in storage.list(result.outputs["checkpoints"]))
    # the registered weights are the best epoch's: they reproduce its NMSE outside Ray
    assert abs(_valid_nmse_of_registered_model(storage, result.model_version) - m["valid_nmse"]) < 1e-3

    runs_before = storage.list(storage.uri("runs", "train"))
    again = run_train(cfg, storage)
    assert not again.published and again.model_version == result.model_version
    assert again.metrics["valid_nmse"] == m["valid_nmse"]
    assert storage.list(storage.uri("runs", "train")) == runs_before  # nothing trained, nothing written


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(catalog, ray_local):
    from train_faults import KILL_AFTER_EPOCH

    base_cfg, storage = catalog
    # WPE here, so the second objective also runs end to end; seed 1 = a version of its own
    cfg = _train_cfg(base_cfg, epochs=5, patience=10, seed=1, loss="wpe", max_failures=2, windows_per_clip=1,
                     epoch_hook="train_faults:kill_worker_once")
    result = run_train(cfg, storage)
    assert result.published and result.metrics["attempts"] == 2
    curve = registered(storage, result.model_version)["curve"]
    print("epoch/attempt/attempt_start_epoch:", [(h["epoch"], h["attempt"], h["attempt_start_epoch"]) for h in curve])
    assert [h["epoch"] for h in curve] == list(range(5))  # every epoch exactly once
    first = [h for h in curve if h["attempt"] == 0]
    resumed = [h for h in curve if h["attempt"] == 1]
    # the replacement group started from a checkpoint, not from scratch
    assert resumed and resumed[0]["attempt_start_epoch"] == resumed[0]["epoch"] > 0
    assert first[-1]["epoch"] == resumed[0]["epoch"] - 1 <= KILL_AFTER_EPOCH
    assert np.isfinite(result.metrics["valid_nmse"])


@pytest.mark.slow
def test_train_command_on_the_embedded_default(tmp_path):
    """`deepcontent pipeline` then `deepcontent train` as a user runs them (embedded S3 server,
    Ray started and stopped by the command); a second `train` finds the model registered."""
    import os
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0")
    try:
        _pipeline_then_train_twice(tmp_path, env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _pipeline_then_train_twice(tmp_path, env):
    import subprocess
    import sys

    cli = [sys.executable, "-m", "deepcontent.cli"]
    common = ["synth.songs=80", "synth.users=800", "synth.clip_seconds=4", "matrices.split_fractions=[0.6,0.3,0.1]",
              "synth.gtzan_per_genre=0", "synth.mtat_clips=0", "spark.master=local[2]", "factorize.factors=8"]
    out = subprocess.run([*cli, "pipeline", "--json", *common], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    train = [*cli, "train", "--json", *common, "train.epochs=2", "train.batch_size=16"]
    out = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["published"] and result["model_version"] and np.isfinite(result["metrics"]["valid_nmse"])
    assert (tmp_path / ".deepcontent" / "s3" / "deepcontent" / "models" / "production.json").exists()
    again = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and not json.loads(again.stdout.strip().splitlines()[-1])["published"]


def test_a_catalog_four_times_the_cache_streams_and_learns_like_a_resident_one(catalog, ray_local):
    """train.cache_bytes a quarter of the catalog's spectrograms: each worker's train and valid
    shards (more than its budget) spill to local disk and stream back every epoch; the run
    completes, holds no more clip memory than the budget, and its validation NMSE is within the
    seed-to-seed spread of resident runs on the same data."""
    from deepcontent.train.clip_cache import split_clip_bytes

    base_cfg, storage = catalog
    spectrograms = build_targets(storage)
    clips = storage.read_parquet(spectrograms.spectrogram_files, columns=["n_frames"])["n_frames"]
    catalog_bytes = split_clip_bytes(clips, n_mels=spectrograms.n_mels, n_factors=spectrograms.n_factors, min_frames=1)
    resident = [run_train(_train_cfg(base_cfg, epochs=20, patience=5, seed=s), storage) for s in (0, 2)]
    streamed = run_train(_train_cfg(base_cfg, epochs=20, patience=5, cache_bytes=catalog_bytes // 4), storage)

    curves = [registered(storage, r.model_version)["curve"] for r in (*resident, streamed)]
    assert all(h["cache"]["train"] == h["cache"]["valid"] == "resident" for c in curves[:2] for h in c)
    assert all(h["cache"]["train"] == h["cache"]["valid"] == "streaming" for h in curves[2])
    assert all(h["cache"]["clip_bytes_held"] <= h["cache"]["budget_bytes"] for h in curves[2])
    # The object-store pages the load read its blocks from are not in the worker's resident
    # set once it trains (before they were released: ~50 MiB here, 0.3 GiB for a 1 GiB shard).
    assert all(h["worker_rss_parts_bytes"]["shmem"] < 8 * 2**20 for c in curves for h in c), \
        [h["worker_rss_parts_bytes"] for c in curves for h in c]
    nmse = [r.metrics["valid_nmse"] for r in resident]
    got = streamed.metrics["valid_nmse"]
    print(f"valid NMSE resident seeds 0/2 {nmse[0]:.4f}/{nmse[1]:.4f}, streaming (seed 0) {got:.4f}; "
          f"peak worker RSS resident {curves[0][-1]['worker_peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"streaming {curves[2][-1]['worker_peak_rss_bytes'] / 2**20:.0f} MiB")
    assert got < 1.0
    # Two seeds estimate the spread poorly (runs here: 0.016 and 0.033 apart), so the bounds are
    # a margin of noise around the resident pair: streaming must learn no worse than the worse
    # resident run, and land nowhere the resident runs could not (a broken stream, e.g. one
    # that repeats or drops row groups, moves the NMSE by far more).
    spread = abs(nmse[0] - nmse[1])
    assert got <= max(nmse) + max(2 * spread, 0.03), (got, nmse)
    assert got >= min(nmse) - max(3 * spread, 0.06), (got, nmse)


def test_a_worker_releases_the_object_store_pages_it_read(ray_local):
    """A Ray worker that read a 32 MiB object has its pages in its resident set (shared
    memory); :func:`release_object_store_pages` finds Ray's store mapping and drops them, and
    the object still reads back intact."""
    import ray

    @ray.remote
    def read_then_release(ref_list):
        from deepcontent.engines.ray import release_object_store_pages

        def shmem() -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssShmem"))

        arr = ray.get(ref_list[0])  # zero-copy: a view of the store's pages
        total = int(arr.sum())  # touch every page
        before = shmem()
        released = release_object_store_pages()
        after = shmem()
        return before, released, after, int(arr.sum()) == total

    ref = ray.put(np.arange(4 * 2**20, dtype=np.int64))  # 32 MiB
    before, released, after, intact = ray.get(read_then_release.remote([ref]))
    assert before >= 32 * 2**20 and released >= 32 * 2**20, (before, released)
    assert after < before - 30 * 2**20, (before, after)
    assert intact
