"""The evaluate stage's transfer on generated GTZAN- and MagnaTagATune-layout sets: every feature
set (spherical K-means, a deep_cnn variant's predicted factors and penultimate layer) under the
stratified and the grouped protocol, their harmonic / percussive / original late fusion, and the
MTAT tag AUC — the code the pipeline runs, on sets small enough for a unit test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from deepcontent.evaluate.regressors import FixedFeatures, SplitArrays
from deepcontent.stages.evaluate import _transfer
from deepcontent.storage import join
from deepcontent.synth.generate import _run_clip_jobs, gtzan_jobs, mtat_clips
from support import config_for


@pytest.fixture
def target_sets(file_storage, tmp_path):
    cfg = config_for(file_storage, tmp_path, **{
        "synth.gtzan_per_genre": 3, "synth.mtat_clips": 20, "evaluate.late_fusion": "true",
        "transfer.max_logo_groups": 5, "transfer.grouped_folds": 3, "transfer.inner_folds": 2})
    g_jobs = [dataclasses.replace(j, seconds=3.0) for j in gtzan_jobs(cfg, file_storage)]
    m_jobs, annotations = mtat_clips(cfg, file_storage)
    m_jobs = [dataclasses.replace(j, seconds=3.0) for j in m_jobs]
    _run_clip_jobs(file_storage, g_jobs + m_jobs, workers=1, what="test clips")
    file_storage.write_bytes(join(file_storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.mtat),
                                  "annotations_final.csv"), annotations)
    base = file_storage.raw_uri(cfg.storage.raw_prefix, cfg.sources.gtzan)
    # two "artists" per genre: clips 0-1 and clip 2
    rows = [f"{j.uri[len(base) + 1:]},{j.uri.split('/')[-2]}-{int(j.uri[-9:-4]) // 2}" for j in g_jobs]
    file_storage.write_bytes(join(base, "groups.csv"), ("path,artist\n" + "\n".join(rows) + "\n").encode())
    return cfg


def test_transfer_late_fusion_and_deep_cnn_features_under_both_protocols(target_sets, file_storage, torch_one_thread):
    import torch

    from deepcontent.models.factory import build_model

    cfg = target_sets
    rng = np.random.default_rng(0)
    split = SplitArrays(train_clips=[rng.random((128, 80)).astype(np.float32) for _ in range(6)],
                        y_train=rng.normal(size=(6, 3)), valid_clips=[rng.random((128, 80)).astype(np.float32)],
                        y_valid=rng.normal(size=(1, 3)), test_clips=[], target_mean=np.zeros(3),
                        target_std=np.ones(3))
    fixed = FixedFeatures(split, compression=cfg.spectrograms.compression, words_grid=(8,), kmeans_centroids=8)
    torch.manual_seed(0)
    model = build_model("deep_cnn", n_factors=3, channels=(8, 8), pool_sizes=(2, 2), embedding_dim=6).eval()
    cache = {"cnn_models": {"deep_cnn": (model, {"n_frames": 43, "target_mean": np.zeros(3),
                                                 "target_std": np.ones(3)}, "deep_cnn-test")}}
    out = _transfer(cfg, file_storage, fixed, cache)

    gtzan = out["gtzan"]
    assert gtzan["clips_found"] == gtzan["clips_used"] == 30 and "clips_left_out" not in gtzan
    assert gtzan["grouping"]["groups"] == 20 and gtzan["grouping"]["source"].endswith("groups.csv")
    names = {"kmeans", "deep_cnn_factors", "deep_cnn_penultimate"}
    assert names | {f"{n}_hpss_fusion" for n in names} <= set(gtzan)
    for name in names | {f"{n}_hpss_fusion" for n in names}:
        r = gtzan[name]
        assert 0.0 <= r["stratified_mean"] <= 1.0 and 0.0 <= r["grouped_accuracy"] <= 1.0, name
        assert r["grouped"]["protocol"] == "stratified_group_kfold" and r["grouped"]["folds"] == 3, name
        assert np.array(r["confusion"]).sum() == 30 and np.array(r["grouped"]["confusion"]).sum() == 30, name
    assert gtzan["deep_cnn_factors"]["dim"] == 3 and gtzan["deep_cnn_penultimate"]["dim"] == 6
    assert all(len(c) == 3 for c in gtzan["kmeans_hpss_fusion"]["chosen_C"])  # one C per fused view

    mtat = out["mtat"]
    for name in names:
        assert "top50" in mtat[name] and "all" in mtat[name], name
