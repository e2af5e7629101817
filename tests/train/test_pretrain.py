"""Self-supervised pretraining: the contrastive objective and its augmentations as pure
functions, the held-out split, loading a backbone into a train model, and the pretrain stage on
Ray Train end to end (registers, resumes after a killed worker, re-runs as nothing to do) with a
train run fine-tuned from it."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from deepcontent.errors import TrainingDataError
from deepcontent.models import build_model
from deepcontent.models.augment import frequency_mask, time_mask
from deepcontent.stages.pretrain import pretraining_clips
from deepcontent.train.loop import load_backbone, model_kwargs
from deepcontent.train.objectives import info_nce


def _brute_info_nce(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        logits = [float(z[i] @ z[k]) / t for k in range(2 * n) if k != i]
        pos = float(z[i] @ z[j]) / t
        total += -(pos - math.log(sum(math.exp(v) for v in logits)))
    return total / (2 * n)


def test_info_nce_is_the_mean_cross_entropy_of_finding_the_other_view():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    loss, correct = info_nce(z1, z2, temperature=0.5)
    assert float(loss) == pytest.approx(_brute_info_nce(z1, z2, 0.5), rel=1e-5)
    # identical views of well-separated clips: every positive ranks first, and the loss is small
    same = torch.eye(6) * 10
    loss, correct = info_nce(same, same, temperature=0.1)
    assert int(correct) == 12 and float(loss) < 1e-3
    with pytest.raises(ValueError, match="at least 2 pairs"):
        info_nce(torch.ones(1, 3), torch.ones(1, 3), temperature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(z1, z2, temperature=0.0)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_masks_silence_bounded_spans_and_keep_shape_and_dtype(kind):
    x = np.ones((4, 16, 50), np.float16)
    x = torch.from_numpy(x) if kind == "torch" else x
    gen = torch.Generator().manual_seed(1) if kind == "torch" else np.random.default_rng(1)
    y = time_mask(x, masks=2, max_frames=6, generator=gen)
    assert type(y) is type(x) and y.shape == x.shape and y.dtype == x.dtype
    cols = np.asarray(y[:, 0, :] == 0)
    assert cols.sum(axis=1).max() <= 12 and cols.any()  # at most two spans of 6 frames, some drawn
    assert (np.asarray(y == 0).all(axis=1) == cols).all()  # a masked frame is silent in every band
    z = frequency_mask(x, masks=1, max_bands=3, generator=gen)
    rows = np.asarray(z[:, :, 0] == 0)
    assert rows.sum(axis=1).max() <= 3 and (np.asarray(z == 0).all(axis=2) == rows).all()
    assert time_mask(x, masks=0, max_frames=6) is x
    with pytest.raises(ValueError, match="masks"):
        time_mask(x, masks=-1, max_frames=3)


def test_the_held_out_tracks_are_a_stable_share_of_every_clip():
    ids = [f"TR{i:06d}" for i in range(2000)]
    clips = pa.table({"track_id": ids, "n_mels": pa.array([128] * 2000, pa.int32()),
                      "n_frames": pa.array([400] * 2000, pa.int32())})
    out = pretraining_clips(clips, valid_fraction=0.1, seed=0)
    held = set(out["valid"]["track_id"].to_pylist())
    assert out["train"].num_rows + out["valid"].num_rows == 2000 and 150 < len(held) < 250
    assert not held & set(out["train"]["track_id"].to_pylist())
    grown = pa.concat_tables([clips, pa.table({"track_id": ["TRNEW"], "n_mels": pa.array([128], pa.int32()),
                                               "n_frames": pa.array([9], pa.int32())})])
    assert held <= set(pretraining_clips(grown, valid_fraction=0.1, seed=0)["valid"]["track_id"].to_pylist())
    assert set(out["train"]["item_idx"].to_pylist()) == {-1}
    with pytest.raises(TrainingDataError, match="mix n_mels"):
        pretraining_clips(pa.table({"track_id": ["a", "b"], "n_mels": pa.array([1, 2], pa.int32()),
                                    "n_frames": pa.array([5, 5], pa.int32())}), valid_fraction=0.5, seed=0)
    with pytest.raises(TrainingDataError, match="at least 2 clips"):
        pretraining_clips(clips.slice(0, 3), valid_fraction=0.1, seed=0)


def test_validation_scores_every_held_out_clip_valid_pairs_times_with_the_same_draws():
    from types import SimpleNamespace

    from deepcontent.train.data import ClipBank
    from deepcontent.train.objectives import Contrastive

    n, frames, mels = 5, 40, 16
    g = torch.Generator().manual_seed(0)
    bank = ClipBank(frames=torch.randn(n * frames, mels, generator=g).half(), offsets=torch.arange(n) * frames,
                    lengths=torch.full((n,), frames), targets=torch.zeros(n, 1), items=torch.full((n,), -1),
                    track_ids=[str(i) for i in range(n)])
    clips = SimpleNamespace(banks=lambda: iter([bank]))
    cfg = SimpleNamespace(window_frames=20, batch_size=4, seed=3, gain_db=0.0)
    spec = {"temperature": 0.1, "time_masks": 0, "time_mask_frames": 0, "freq_masks": 0, "freq_mask_bands": 0}
    torch.manual_seed(0)
    model = build_model("paper_cnn", n_factors=8, n_mels=mels, n_frames=20, filter_length=3, pool_sizes=(2, 2))
    model.eval()
    one = Contrastive(cfg, spec, device=torch.device("cpu"), autocast=contextlib.nullcontext)
    four = Contrastive(cfg, {**spec, "valid_pairs": 4}, device=torch.device("cpu"), autocast=contextlib.nullcontext)
    once, again = one.validate(model, clips), one.validate(model, clips)
    assert once == again and once[2] == 2 * 4  # batches of 4 + 1 clips: the lone fifth has no negative
    many = four.validate(model, clips)
    assert many[2] == 4 * once[2]  # every clip scored four times
    assert many[0] != pytest.approx(4 * once[0])  # other draws, not the first pair four times
    with pytest.raises(ValueError, match="valid_pairs"):
        Contrastive(cfg, {**spec, "valid_pairs": 0}, device=torch.device("cpu"), autocast=contextlib.nullcontext)


def test_a_backbone_loads_into_a_train_model_except_its_output_layer():
    torch.manual_seed(0)
    pre = build_model("paper_cnn", n_factors=32, n_mels=16, n_frames=60)
    model = build_model("paper_cnn", n_factors=5, n_mels=16, n_frames=60)
    out_before = model.output.weight.clone()
    load_backbone(model, pre.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), pre.state_dict().items()):
        if not k.startswith("output."):
            assert torch.equal(a, b), k
    assert torch.equal(model.output.weight, out_before)  # the projection is not the factors' layer
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(build_model("deep_cnn", n_factors=5, n_mels=16), pre.state_dict())


def test_a_pretrained_backbone_learns_at_its_own_rate_and_the_output_layer_at_lr():
    from deepcontent.train.loop import param_groups

    model = build_model("paper_cnn", n_factors=5, n_mels=16, n_frames=60)
    groups = param_groups(model, lr=1e-3, backbone_lr_scale=0.1)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-4), 1e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(model.output.weight), id(model.output.bias)}
    assert len(groups[0]["params"]) + 2 == len(list(model.parameters()))
    only = param_groups(model, lr=1e-3)  # from scratch: one group, as before
    assert len(only) == 1 and len(only[0]["params"]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="no output layer"):
        param_groups(torch.nn.Linear(3, 2), lr=1e-3, backbone_lr_scale=0.5)


def test_pretrain_registers_resumes_after_a_killed_worker_and_initialises_train(catalog, ray_local):
    from deepcontent.registry import load_model, registered, variant_pointer
    from support import run_stage

    base_cfg, storage = catalog
    cfg = base_cfg.model_copy(deep=True)
    for k, v in {"num_workers": 2, "batch_size": 32, "epochs": 4, "patience": 10, "windows_per_clip": 2,
                 "projection_dim": 32, "max_failures": 2, "epoch_hook": "train_faults:kill_worker_once"}.items():
        setattr(cfg.pretrain, k, v)
    result = run_stage("pretrain", cfg, storage)
    assert result.published and result.model_version.startswith("pretrain-paper_cnn-")
    meta = registered(storage, result.model_version)
    curve = meta["curve"]
    assert [h["epoch"] for h in curve] == list(range(4)) and meta["metrics"]["attempts"] == 2  # resumed
    assert all(math.isfinite(h["valid_loss"]) and 0.0 <= h["valid_top1"] <= 1.0 for h in curve)
    # InfoNCE over batches of 32 pairs starts near log(63); training must bring it down
    assert curve[-1]["valid_loss"] < math.log(63) and meta["metrics"]["valid_top1"] > 2 / 64
    assert variant_pointer(storage, "pretrained")["model_version"] == result.model_version
    model, artifact = load_model(storage, result.model_version)
    assert artifact["targets"] == "contrastive" and artifact["pretrained_on"]["clips"] == meta["counts"]["clips"]
    assert not run_stage("pretrain", cfg, storage).published  # registered: nothing trains again

    tcfg = base_cfg.model_copy(deep=True)
    # a backbone learning rate a millionth of the output layer's: the pretrained layers stay put
    for k, v in {"num_workers": 2, "batch_size": 32, "epochs": 2, "windows_per_clip": 1,
                 "init_from": "pretrained", "init_lr_scale": 1e-6}.items():
        setattr(tcfg.train, k, v)
    tuned = run_stage("train", tcfg, storage)
    tmeta = registered(storage, tuned.model_version)
    assert tmeta["pretrained_from"]["model_version"] == result.model_version
    assert tmeta["inputs"]["pretrained_model"] == result.model_version and math.isfinite(tuned.metrics["valid_nmse"])
    tuned_model, _ = load_model(storage, tuned.model_version)
    pre_state, tuned_state = model.state_dict(), tuned_model.state_dict()
    for k in ("conv1.weight", "conv2.weight", "dense.weight"):
        assert (tuned_state[k] - pre_state[k]).abs().max() < 1e-5, k  # Adam steps of ≈ lr × 1e-6
    torch.manual_seed(tcfg.train.seed)  # the loop's initial net, before the backbone is loaded
    initial = build_model("paper_cnn", n_factors=tuned_state["output.weight"].shape[0],
                          **model_kwargs(tcfg.train, n_mels=pre_state["conv1.weight"].shape[1]))
    assert (tuned_state["output.weight"] - initial.output.weight).abs().max() > 1e-4  # the new layer learns at lr


def test_same_label_retrieval_map_by_hand_and_against_chance():
    from deepcontent.evaluate.transfer import label_retrieval_map

    # query 0 ranks 1 (same), 2 (other), 3 (same): AP = (1/1 + 2/3) / 2; by symmetry of this layout
    # every query of the 1-D line below has its own hand-worked AP
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    r = label_retrieval_map(x, ["a", "a", "b", "b"])
    assert r["n_queries"] == 4 and 0 < r["map"] <= 1
    clusters = np.repeat(np.eye(4), 25, axis=0) + 0.01 * np.random.default_rng(0).standard_normal((100, 4))
    perfect = label_retrieval_map(clusters, np.repeat(list("abcd"), 25))
    assert perfect["map"] == pytest.approx(1.0) and perfect["map_se"] == pytest.approx(0.0, abs=1e-12)
    noise = np.random.default_rng(1).standard_normal((400, 6))
    r = label_retrieval_map(noise, np.repeat(list("abcd"), 100))
    assert abs(r["map"] - r["chance"]) < 0.05 and r["chance"] == pytest.approx(99 / 399)
    # mAP and its standard error against scikit-learn's average precision, query by query
    from sklearn.metrics import average_precision_score

    y = np.repeat(list("abcd"), 100)
    z = (noise - noise.mean(0)) / noise.std(0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    aps = [average_precision_score(np.delete(y == y[i], i), np.delete(z @ z[i], i)) for i in range(len(y))]
    assert r["map"] == pytest.approx(np.mean(aps)) and r["map_se"] == pytest.approx(np.std(aps, ddof=1) / 20)
    single = label_retrieval_map(np.eye(3), ["a", "b", "c"])  # nobody has a relevant other clip
    assert single["n_queries"] == 0 and math.isnan(single["map"]) and math.isnan(single["map_se"])


def test_the_finetuned_variant_starts_from_the_evaluations_pretrained_model():
    from deepcontent.config import load_config
    from deepcontent.train.variants import variant_config

    cfg = load_config(None, environ={}, overrides=["evaluate.pretrained_model=pretrain-paper_cnn-abc",
                                                   "evaluate.pretrained_registry_root=s3://corpus/root"])
    v = variant_config(cfg, "cnn_finetuned").train
    assert (v.init_from, v.init_registry_root, v.model, v.loss, v.variant) == (
        "pretrain-paper_cnn-abc", "s3://corpus/root", "paper_cnn", "mse", "cnn_finetuned")
    assert variant_config(cfg, "cnn_mse").train.init_from is None


@pytest.mark.slow
def test_pretrain_on_the_real_corpus_learns_to_find_the_other_window(s3_server, spark, ray_local, tmp_path):
    """The full-corpus run (the first half of scripts/pretrain_experiment.sh): the real-audio
    corpus from the pinned Debian archive (the .debs cached where scripts/build_real_corpus.sh
    keeps them; skipped when the archive cannot be reached), its pretraining packages ingested as
    an audio-only folder catalog, whole-track spectrograms (up to 30 min), `pretrain` with the
    default objective; registered, with the held-out InfoNCE below chance and top-1 above it."""
    import shutil
    import uuid
    from pathlib import Path

    from deepcontent import corpus as C
    from deepcontent.registry import registered
    from deepcontent.storage import Storage
    from support import config_for, run_stage

    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed: the real-audio corpus needs a Debian machine")
    repo = Path(__file__).resolve().parents[2]
    pins = C.read_lock(repo / "scripts" / "real_corpus.lock")
    try:
        built = C.build(pins, out=tmp_path / "corpus", jobs=2, log=lambda m: None)
    except C.ArchiveUnreachable as exc:
        pytest.skip(f"the Debian archive cannot be reached from here: {exc}")
    except C.PinUnavailable as exc:
        pytest.skip(f"this machine's apt sources no longer offer a pinned version: {str(exc).splitlines()[0]}")
    split = C.split_corpus(built.out, tmp_path / "split", fraction=0.7, seed=0)
    storage = Storage(f"s3://t-{uuid.uuid4().hex[:12]}/corpus", endpoint_url=s3_server.endpoint_url,
                      credentials=s3_server.credentials)
    storage.ensure_root()
    cfg = config_for(storage, tmp_path, **{"sources.catalog": "folder",
                                          "sources.audio": (tmp_path / "split" / "pretrain").as_uri(),
                                          "spectrograms.max_seconds": 1800, "pretrain.corpus": "debian-70pct"})
    run_stage("ingest", cfg, storage, spark)
    spectrograms = run_stage("spectrograms", cfg, storage, spark)
    assert spectrograms.counts["computed"] == split["tracks"]["pretrain"] and not spectrograms.quarantined
    result = run_stage("pretrain", cfg, storage)
    assert result.published
    meta = registered(storage, result.model_version)
    batch = cfg.pretrain.batch_size
    assert meta["metrics"]["valid_loss"] < math.log(2 * batch - 1)  # chance: the other view among 2B - 1
    assert meta["metrics"]["valid_top1"] > 1 / (2 * batch - 1)
    assert meta["counts"]["clips"] == split["tracks"]["pretrain"]
