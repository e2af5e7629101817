"""Train-stage pieces that need no Ray: clip banks and window cropping, target standardisation,
the Ray Data join, clip-level prediction, the hardware backend and model versions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepcontent.config import TrainConfig, load_config
from deepcontent.models import PaperCNN, consecutive_windows
from deepcontent.train.backend import resolve_backend
from deepcontent.datasets import vectors as list_matrix
from deepcontent.train.data import ClipBank, standardize
from deepcontent.train.clip_data import attach_targets
from deepcontent.train.loop import model_kwargs, predict_clips
from deepcontent.registry import model_version
from deepcontent.stages.train import steps_per_epoch


def _rows(lengths, *, n_mels=4, f=3, seed=0):
    rng = np.random.default_rng(seed)
    mels = [rng.random((n_mels, n)).astype(np.float16) for n in lengths]
    targets = rng.standard_normal((len(lengths), f)).astype(np.float32)
    offsets = pa.array(np.arange(0, targets.size + 1, f, dtype=np.int32))
    table = pa.table({
        "track_id": [f"TR{i:04d}" for i in range(len(lengths))],
        "n_mels": pa.array([n_mels] * len(lengths), pa.int32()),
        "n_frames": pa.array(lengths, pa.int32()),
        "mel": pa.array([m.tobytes() for m in mels], pa.binary()),
        "target": pa.ListArray.from_arrays(offsets, pa.array(targets.reshape(-1), pa.float32())),
        "item_idx": pa.array(np.arange(len(lengths)), pa.int32()),
    })
    return table, mels, targets


def test_clip_bank_holds_clips_back_to_back_and_pads_short_ones():
    table, mels, targets = _rows([10, 3, 7])
    bank = ClipBank.from_batches([table.slice(0, 2), table.slice(2)], min_frames=5, n_factors=3, n_mels=4)
    assert len(bank) == 3 and bank.frames.shape == (10 + 5 + 7, 4)
    assert bank.lengths.tolist() == [10, 5, 7] and bank.offsets.tolist() == [0, 10, 15]
    assert np.array_equal(bank.clip(0).numpy(), mels[0])
    assert np.array_equal(bank.clip(1)[:, :3].numpy(), mels[1]) and not bank.clip(1)[:, 3:].any()
    assert np.allclose(bank.targets.numpy(), targets) and bank.items.tolist() == [0, 1, 2]


def test_random_windows_are_real_slices_of_their_own_clip_and_cover_every_offset():
    table, mels, _ = _rows([12, 6, 9])
    bank = ClipBank.from_batches([table], min_frames=6, n_factors=3, n_mels=4)
    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 1, 2] * 200)
    w = bank.random_windows(idx, n_frames=6, generator=gen)
    assert w.shape == (600, 4, 6) and w.dtype == torch.float16
    starts = {0: set(), 2: set()}
    for k in range(600):
        c = int(idx[k])
        clip = mels[c]
        hits = [o for o in range(clip.shape[1] - 5) if np.array_equal(clip[:, o : o + 6], w[k].numpy())]
        assert hits, f"window {k} is not a slice of clip {c}"
        if c in starts:
            starts[c].add(hits[0])
    assert starts[0] == set(range(7)) and starts[2] == set(range(4))  # uniform over all valid offsets


def test_a_malformed_spectrogram_names_its_track():
    table, _, _ = _rows([5, 5])
    bad = table.set_column(3, "mel", pa.array([b"\x00" * 10, table["mel"][1].as_py()], pa.binary()))
    with pytest.raises(ValueError, match="TR0000"):
        ClipBank.from_batches([bad], min_frames=3, n_factors=3, n_mels=4)
    with pytest.raises(ValueError, match="n_mels=4, expected 8"):
        ClipBank.from_batches([table], min_frames=3, n_factors=3, n_mels=8)


def test_standardize_uses_the_given_statistics_and_survives_constant_factors():
    y = np.array([[1.0, 5.0], [3.0, 5.0]])
    z, mean, std = standardize(y)
    assert np.allclose(z, [[-1, 0], [1, 0]]) and np.allclose(mean, [2, 5]) and np.allclose(std, [1, 1])
    z2, _, _ = standardize(np.array([[2.0, 7.0]]), mean=mean, std=std)
    assert np.allclose(z2, [[0, 2]])


def test_attach_targets_keeps_only_tracks_with_targets_in_batch_order():
    table, _, _ = _rows([5, 5, 5])
    spec = table.select(["track_id", "n_mels", "n_frames", "mel"])
    targets = pa.table({"track_id": ["TR0002", "TR0000"], "item_idx": pa.array([7, 9], pa.int32()),
                        "target": pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32()))})
    out = attach_targets(spec, targets=targets)
    assert out["track_id"].to_pylist() == ["TR0000", "TR0002"]
    assert out["item_idx"].to_pylist() == [9, 7] and list_matrix(out["target"]).tolist() == [[3, 4], [1, 2]]


def test_clip_prediction_is_the_mean_over_consecutive_windows():
    torch.manual_seed(0)
    model = PaperCNN(n_factors=3, n_mels=16, n_frames=60, n_filters=8, hidden=16).eval()
    clips = [torch.rand(16, 130), torch.rand(16, 40), torch.rand(16, 100)]
    pred = predict_clips(model, clips, n_frames=60, batch_size=3)
    for c, p in zip(clips, pred):
        w = consecutive_windows(c, n_frames=60, cover_tail=True)
        assert torch.allclose(p, model(w).mean(0), atol=1e-5)


def test_backend_is_configuration_only():
    cpu = resolve_backend(TrainConfig())
    assert (cpu.torch_backend, cpu.autocast_dtype, cpu.pin_memory, cpu.threads) == ("gloo", None, False, 1)
    gpu = resolve_backend(TrainConfig(use_gpu=True, threads_per_worker=4))
    assert (gpu.torch_backend, gpu.autocast_dtype, gpu.pin_memory, gpu.threads) == ("nccl", "bfloat16", True, 4)
    assert resolve_backend(TrainConfig(use_gpu=True, precision="fp32")).autocast_dtype is None
    with pytest.raises(ValueError, match="bf16"):
        resolve_backend(TrainConfig(precision="bf16"))


def test_model_version_follows_config_data_and_code_but_not_operational_settings():
    cfg = load_config(None, environ={})
    inputs = {"features/spectrograms": "spectrograms-1", "factors/plays/item_factors": "factorize-1"}
    v = model_version(cfg, inputs=inputs, code="0.1.0+abc")
    assert v.startswith("paper_cnn-") and v == model_version(cfg, inputs=dict(reversed(inputs.items())), code="0.1.0+abc")
    assert v != model_version(cfg, inputs={**inputs, "factors/plays/item_factors": "factorize-2"}, code="0.1.0+abc")
    assert v != model_version(cfg, inputs=inputs, code="0.1.0+def")
    changed = load_config(None, overrides=["train.lr=0.01"], environ={})
    assert v != model_version(changed, inputs=inputs, code="0.1.0+abc")
    operational = load_config(None, overrides=["train.max_failures=5", "train.epoch_hook=x:y"], environ={})
    assert v == model_version(operational, inputs=inputs, code="0.1.0+abc")
    # the backbone's learning-rate scale names a fine-tuned model only
    assert v == model_version(load_config(None, overrides=["train.init_lr_scale=0.3"], environ={}),
                              inputs=inputs, code="0.1.0+abc")
    tuned = [load_config(None, overrides=["train.init_from=pretrained", f"train.init_lr_scale={x}"], environ={})
             for x in (1.0, 0.3)]
    assert len({v, *(model_version(c, inputs=inputs, code="0.1.0+abc") for c in tuned)}) == 3


def test_model_kwargs_and_steps_per_epoch():
    assert model_kwargs(TrainConfig(window_frames=100), n_mels=64) == {"n_mels": 64, "n_frames": 100}
    assert "n_frames" not in model_kwargs(TrainConfig(model="deep_cnn"), n_mels=128)
    assert steps_per_epoch(n_train_clips=100, windows_per_clip=4, batch_size=32, num_workers=2) == 7
    assert steps_per_epoch(n_train_clips=1, windows_per_clip=1, batch_size=64, num_workers=4) == 1


def test_train_has_a_command_and_a_job():
    import subprocess
    import sys
    from pathlib import Path

    from deepcontent.cli import COMMANDS

    assert "train" in COMMANDS
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(repo / "jobs" / "train.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout
