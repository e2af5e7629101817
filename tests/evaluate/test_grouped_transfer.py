"""Transfer on any GTZAN-layout folder, with group-aware splits.

The central case: every group (artist, album, source) has a distinctive pure tone and the labels
are otherwise unlearnable. A stratified k-fold puts clips of one group on both sides of the split,
so a feature that hears the tone scores near 1; a grouped protocol holds whole groups out, and the
same feature falls to chance or below, as the nearest clip from another group does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from deepcontent.evaluate.clip_features import average_by_track, excerpt_bounds, excerpts, logmel_statistics
from deepcontent.evaluate.target_folder import layout, parse_groups_csv
from deepcontent.evaluate.transfer import (
    cross_group_nn_accuracy,
    group_splits,
    grouped_nested_cv_svm_accuracy,
    transfer_protocols,
)
from support import config_for, run_stage

CS = (0.01, 1.0)
SR = 22050


def tone_folder(root: Path, *, labels=("A", "B", "C"), groups_per_label=3, clips_per_group=4, seconds=1.5,
                nested=False, seed=0) -> list[tuple[str, str]]:
    """A GTZAN-layout folder of WAVs where group g is a pure tone of its own (a major third above
    group g-1, whose label is another), plus a little noise: only the group is audible.
    ``nested``: ``<label>/<group>/<clip>.wav``; else ``<label>/<group>_<clip>.wav``. Returns
    ``[(path relative to root, group)]``."""
    rng = np.random.default_rng(seed)
    n_groups = len(labels) * groups_per_label
    t = np.arange(int(seconds * SR)) / SR
    rows = []
    for g in range(n_groups):
        freq = 220.0 * 2 ** (g * 4 / 12)
        for k in range(clips_per_group):
            y = 0.3 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) + 0.05 * rng.standard_normal(len(t))
            rel = f"{labels[g % len(labels)]}/g{g:02d}/clip{k}.wav" if nested else f"{labels[g % len(labels)]}/g{g:02d}_{k}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, y.astype(np.float32), SR, subtype="PCM_16")
            rows.append((rel, f"artist{g:02d}"))
    return rows


# -- pure parts ---------------------------------------------------------------------------------

def test_group_splits_hold_whole_groups_out_logo_when_few_grouped_kfold_when_many():
    y = np.repeat(["a", "b"], 20)
    g = np.array([f"g{i // 4}" for i in range(40)])  # 10 groups of 4, each one label
    splits, info = group_splits(y, g, folds=5, max_logo_groups=10)
    assert info == {"protocol": "leave_one_group_out", "folds": 10, "groups": 10}
    held = np.concatenate([te for _, te in splits])
    assert sorted(held.tolist()) == list(range(40))  # every clip held out exactly once
    for tr, te in splits:
        assert len(set(g[te])) == 1 and not set(g[tr]) & set(g[te])
    splits, info = group_splits(y, g, folds=5, max_logo_groups=9, seed=3)
    assert info["protocol"] == "stratified_group_kfold" and info["folds"] == 5
    for tr, te in splits:
        assert not set(g[tr]) & set(g[te])
        assert set(y[te]) == {"a", "b"}  # stratified where whole groups allow
    with pytest.raises(ValueError, match="1 distinct value"):
        group_splits(y, ["same"] * 40)
    with pytest.raises(ValueError, match="one entry per label"):
        group_splits(y, g[:5])


def test_the_inner_loop_choosing_C_is_grouped_too(monkeypatch):
    import deepcontent.evaluate.transfer as transfer

    rng = np.random.default_rng(0)
    n = 48
    y = np.repeat(["a", "b", "c"], 16)
    groups = np.array([f"g{i // 4}" for i in range(n)])
    X = np.column_stack([np.arange(n), rng.normal(size=(n, 3))])  # column 0 names the clip
    seen = []
    real = transfer.GridSearchCV

    class Spy(real):
        def fit(self, X_part, y_part, **kw):
            clips = X_part[:, 0].astype(int)
            for tr, va in self.cv:
                seen.append((set(groups[clips[tr]]), set(groups[clips[va]])))
            return super().fit(X_part, y_part, **kw)

    monkeypatch.setattr(transfer, "GridSearchCV", Spy)
    got = grouped_nested_cv_svm_accuracy(X, y, groups, folds=4, inner_folds=3, max_logo_groups=4, Cs=CS)
    assert got["protocol"] == "stratified_group_kfold" and got["folds"] == 4 and got["groups"] == 12
    assert seen and all(not tr & va for tr, va in seen)  # no group on both sides of an inner split
    assert np.array(got["confusion"]).sum() == n and sum(got["fold_sizes"]) == n
    assert got["accuracy"] == pytest.approx(np.trace(np.array(got["confusion"])) / n)


def test_a_class_missing_from_training_is_counted_and_never_predicted():
    # label "c" has a single group: leave-one-group-out holds all of it out once, unpredictable
    y = np.array(["a"] * 8 + ["b"] * 8 + ["c"] * 4)
    g = np.array(["a1"] * 4 + ["a2"] * 4 + ["b1"] * 4 + ["b2"] * 4 + ["c1"] * 4)
    X = np.eye(3)[np.searchsorted(["a", "b", "c"], y)] * 5 + np.random.default_rng(1).normal(size=(20, 3)) * 0.1
    got = grouped_nested_cv_svm_accuracy(X, y, g, folds=5, inner_folds=2, Cs=CS)
    assert got["protocol"] == "leave_one_group_out" and got["folds_missing_a_test_class"] == 1
    C = np.array(got["confusion"])
    assert C[2, 2] == 0 and C[:2, :2].trace() == 16  # a and b right, c never predicted
    assert got["accuracy"] == pytest.approx(16 / 20)


def test_nearest_neighbour_from_another_group():
    X = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [0.9, 0.2]])
    y = np.array(["x", "x", "y", "y", "x"])
    g = np.array(["p", "p", "q", "q", "r"])
    got = cross_group_nn_accuracy(X, y, g)
    # clip 0 and 1's nearest other-group clip is clip 4 (x): right; 2 and 3 have only p/r clips
    # of the other label to choose from: wrong; clip 4's is 0 or 1 (x): right
    assert got["accuracy"] == pytest.approx(3 / 5) and got["n_scored"] == 5 and got["n_without_candidate"] == 0
    assert got["any_accuracy"] == pytest.approx(1.0)
    alone = cross_group_nn_accuracy(X, y, ["p"] * 5)
    assert np.isnan(alone["accuracy"]) and alone["n_without_candidate"] == 5


def test_transfer_protocols_fit_the_folds_to_the_data_and_say_why_a_protocol_is_missing():
    rng = np.random.default_rng(2)
    y = np.repeat(["a", "b"], 6)
    X = rng.normal(size=(12, 4)) + (y == "a")[:, None] * 4
    got = transfer_protocols(X, y, None, folds=10, inner_folds=5, Cs=CS)
    assert (got["folds"], got["inner_folds"]) == (6, 5) and got["stratified_mean"] == pytest.approx(1.0)
    assert got["grouped_accuracy"] is None and "no grouping" in got["grouped_skipped"]
    few = transfer_protocols(X[:7], y[:7], None, Cs=CS)  # class b has 1 clip
    assert few["stratified_mean"] is None and "'b' has 1 clip" in few["stratified_skipped"]


def test_excerpts_come_from_the_middle_and_average_back_per_track():
    assert excerpt_bounds(100, excerpt_frames=None) == [(0, 100)]
    assert excerpt_bounds(100, excerpt_frames=120, count=3) == [(0, 100)]  # shorter than one excerpt
    assert excerpt_bounds(100, excerpt_frames=20) == [(40, 60)]
    assert excerpt_bounds(100, excerpt_frames=20, count=3) == [(20, 40), (40, 60), (60, 80)]
    assert excerpt_bounds(50, excerpt_frames=20, count=3) == [(0, 20), (15, 35), (30, 50)]  # overlapping
    clips = [np.tile(np.arange(100.0), (2, 1)), np.ones((2, 30))]
    views, owner = excerpts(clips, excerpt_frames=20, count=2)
    assert owner.tolist() == [0, 0, 1, 1] and all(v.shape == (2, 20) for v in views)
    feats = average_by_track(logmel_statistics(views), owner, 2)
    assert feats.shape == (2, 4) and feats[0, 0] == pytest.approx(49.5) and feats[1, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one excerpt"):
        average_by_track(np.zeros((2, 3)), np.array([0, 0]), 2)


def test_groups_file_and_folder_levels():
    groups = parse_groups_csv("path,artist\n./blues/a.wav,x\nblues\\b.wav,y\n\n", source="g.csv")
    assert groups == {"blues/a.wav": "x", "blues/b.wav": "y"}
    assert parse_groups_csv("rock/c.mp3,z\n", source="g.csv") == {"rock/c.mp3": "z"}  # no header
    with pytest.raises(ValueError, match=r"g.csv line 3: clip 'a/b.wav' is in group 'x' and in group 'y'"):
        parse_groups_csv("path,group\na/b.wav,x\na/b.wav,y\n", source="g.csv")
    with pytest.raises(ValueError, match="g.csv line 1: expected a clip path and a group"):
        parse_groups_csv("only-one-field\n", source="g.csv")
    keys = ["blues/a.wav", "blues/b.wav", "blues/cover.jpg", "top.wav", "rock/c.mp3"]
    lay = layout(keys, groups=groups | {"nowhere.wav": "q"}, non_audio_extensions=[".jpg"])
    assert lay.keys == ["blues/a.wav", "blues/b.wav"] and lay.groups == ["x", "y"] and lay.unused_groups == 1
    assert set(lay.left_out) == {"blues/cover.jpg", "top.wav", "rock/c.mp3"}
    assert lay.left_out["rock/c.mp3"].startswith("no_group") and lay.left_out["top.wav"].startswith("no_label")
    nested = layout(["rock/band1/x.wav", "rock/band2/y.wav", "rock/z.wav"], group_level=2)
    assert nested.labels == ["rock", "rock"] and nested.groups == ["band1", "band2"]
    assert nested.left_out["rock/z.wav"].startswith("no_group")


# -- the stage on a generated folder ------------------------------------------------------------

def test_group_tone_stratified_high_grouped_near_chance_for_every_feature_set(file_storage, tmp_path):
    folder = tmp_path / "tones"
    rows = tone_folder(folder)
    (folder / "groups.csv").write_text("path,group\n" + "".join(f"{p},{g}\n" for p, g in rows))
    cfg = config_for(file_storage, tmp_path, **{"transfer.folder": str(folder), "transfer.model": "none",
                                                "transfer.kmeans_centroids": 16,
                                                "transfer.report_dir": str(tmp_path / "report")})
    result = run_stage("transfer", cfg, file_storage)
    assert result.clips_found == len(rows) == result.clips_used and result.clips_left_out == {}
    assert result.grouping["groups"] == 9 and result.grouping["source"].endswith("groups.csv")
    sets = result.feature_sets
    assert set(sets) == {"kmeans", "logmel_stats", "mfcc_stats"}
    for name, r in sets.items():  # every feature set has both protocols
        assert 0.0 <= r["stratified_mean"] <= 1.0 and 0.0 <= r["grouped_accuracy"] <= 1.0, name
        assert r["grouped"]["protocol"] == "leave_one_group_out" and r["grouped"]["folds"] == 9, name
        assert r["grouped_1nn_accuracy"] is not None, name
    tone = sets["logmel_stats"]  # hears the tone: recognises the group, not the label
    assert tone["stratified_mean"] >= 0.9 and tone["any_1nn_accuracy"] >= 0.9
    assert tone["grouped_accuracy"] <= 0.5 and tone["grouped_1nn_accuracy"] <= 0.5  # chance is 1/3
    # what each number means is written beside the numbers
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert {"stratified_mean", "grouped_accuracy", "grouped_1nn_accuracy", "kmeans"} <= set(metrics["protocol"])
    assert metrics["feature_sets"]["logmel_stats"]["grouped_accuracy"] == tone["grouped_accuracy"]
    html = (tmp_path / "report" / "report.html").read_text()
    assert "accuracy (grouped: leave-one-group-out, 9 folds, 9 groups)" in html
    assert "1-NN accuracy (neighbour from another group)" in html


def test_transfer_command_json_with_group_level_and_a_corrupt_clip(tmp_path):
    folder = tmp_path / "genres"
    rows = tone_folder(folder, labels=("A", "B"), groups_per_label=3, clips_per_group=3, nested=True)
    (folder / "A" / "g00" / "broken.wav").write_bytes(b"RIFF but not really a wav file")
    (folder / "B" / "cover.jpg").write_bytes(b"\xff\xd8 not audio")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "deepcontent.cli", "transfer", str(folder), "--json", "--model", "none",
                          "--group-level", "2", "transfer.kmeans_centroids=8"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    found = len(rows) + 2
    assert result["clips_found"] == found
    assert result["clips_used"] + len(result["clips_left_out"]) == found and result["clips_used"] == len(rows)
    assert result["clips_left_out"]["A/g00/broken.wav"].startswith("undecodable")
    assert result["clips_left_out"]["B/cover.jpg"].startswith("not_audio")
    assert result["grouping"]["groups"] == 6 and result["models"] == {}
    for name in ("kmeans", "logmel_stats", "mfcc_stats"):
        r = result["feature_sets"][name]
        for key in ("stratified_mean", "stratified_std", "grouped_accuracy", "grouped_1nn_accuracy"):
            assert isinstance(r[key], float), (name, key)
    assert "left out" in out.stderr and "A/g00/broken.wav" in out.stderr  # said, not silently dropped
    # --model none reads nothing but the folder: no S3 server, its files written where it would serve them
    assert "no S3 server" in out.stderr and not (tmp_path / ".deepcontent" / "s3server.log").exists()
    assert (tmp_path / ".deepcontent" / "transfer" / "metrics.json").exists()


def test_transfer_command_errors_name_the_bad_input(tmp_path):
    cli = [sys.executable, "-m", "deepcontent.cli", "transfer"]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = subprocess.run(cli + [str(empty), "--model", "none"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1 and str(empty) in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(cli + [str(empty), "--model", "none", "--groups", "nope.csv"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "nope.csv" in out.stderr
    out = subprocess.run(cli + [str(empty), str(tmp_path), "--model", "none"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "one folder" in out.stderr


def test_registered_models_give_features_and_duplicates_are_named(file_storage, tmp_path, torch_one_thread):
    import torch

    from deepcontent.models.factory import build_model
    from deepcontent.registry import ARTIFACT_FORMAT, point_variant, register

    folder = tmp_path / "tones"
    rows = tone_folder(folder, labels=("A", "B"), groups_per_label=2, clips_per_group=3, seconds=1.0)
    (folder / "groups.csv").write_text("".join(f"{p},{g}\n" for p, g in rows))
    cfg = config_for(file_storage, tmp_path, **{"transfer.folder": str(folder), "transfer.model": "all",
                                                "transfer.features": "[models, logmel_stats]",
                                                "transfer.report_dir": str(tmp_path / "report")})
    torch.manual_seed(0)
    params = {"n_mels": 128, "n_frames": 45, "n_filters": 8, "hidden": 16}
    model = build_model("paper_cnn", n_factors=3, **params)
    settings = cfg.spectrograms.mel_settings()
    artifact = {"format": ARTIFACT_FORMAT, "model_version": "paper_cnn-t", "model": "paper_cnn", "model_params": params,
                "n_factors": 3, "n_mels": 128, "window_frames": 45, "input": "log_mel", "targets": "plays",
                "target_mean": [0.0, 0.0, 0.0], "target_std": [1.0, 1.0, 1.0], "state_dict": model.state_dict(),
                "spectrograms": {"settings_key": settings.key(), "mel_settings": settings.to_dict()}}
    register(file_storage, version="paper_cnn-t", artifact=artifact, metadata={"metrics": {}}, promote=True)
    point_variant(file_storage, "cnn_mse", version="paper_cnn-t")
    result = run_stage("transfer", cfg, file_storage)
    assert result.models == {"production": "paper_cnn-t"}
    assert "same model as production" in result.models_left_out["cnn_mse"]
    assert set(result.feature_sets) == {"production_factors", "production_penultimate", "logmel_stats"}
    assert result.feature_sets["production_factors"]["dim"] == 3
    r = result.feature_sets["production_penultimate"]
    assert r["grouped"]["protocol"] == "leave_one_group_out" and r["stratified_mean"] is not None
    # naming a version that is not registered is an error that names it
    from deepcontent.errors import InputMissingError

    with pytest.raises(InputMissingError, match="paper_cnn-nope"):
        run_stage("transfer", cfg.model_copy(update={"transfer": cfg.transfer.model_copy(
            update={"model": "paper_cnn-nope"})}), file_storage)
