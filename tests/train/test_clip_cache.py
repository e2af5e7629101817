"""The worker's clip cache without Ray: resident within the budget, spilled and streamed back by
row group beyond it, every clip accounted for, memory held to the budget."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepcontent.errors import TrainingDataError
from deepcontent.train.clip_cache import (ResidentClips, SpilledClips, cache_budgets, clip_nbytes, load_clips,
                                          split_clip_bytes, split_steps)
from deepcontent.train.data import ClipBank

N_MELS, N_FACTORS, WINDOW = 8, 3, 20


def _batches(n_clips: int, *, per_batch: int = 16, seed: int = 0, lengths=None):
    """Spectrogram rows with targets, as Ray Data hands them to a worker (ragged lengths, some
    shorter than a window)."""
    rng = np.random.default_rng(seed)
    lengths = lengths if lengths is not None else rng.integers(5, 120, n_clips)
    out = []
    for s in range(0, n_clips, per_batch):
        idx = range(s, min(n_clips, s + per_batch))
        mels = [rng.standard_normal((N_MELS, int(lengths[i]))).astype(np.float16) for i in idx]
        targets = rng.standard_normal((len(idx), N_FACTORS)).astype(np.float32)
        out.append(pa.table({
            "track_id": [f"TR{i:05d}" for i in idx], "n_mels": pa.array([N_MELS] * len(idx), pa.int32()),
            "n_frames": pa.array([int(lengths[i]) for i in idx], pa.int32()),
            "mel": pa.array([m.tobytes() for m in mels], pa.binary()),
            "target": pa.array(targets.tolist(), pa.list_(pa.float32())),
            "item_idx": pa.array(list(idx), pa.int32())}))
    return out


def _total_bytes(batches) -> int:
    return sum(clip_nbytes(n_frames=n, n_mels=N_MELS, n_factors=N_FACTORS, min_frames=WINDOW)
               for b in batches for n in b["n_frames"].to_pylist())


def _load(batches, budget, tmp_path):
    return load_clips(batches, budget_bytes=budget, spill_path=str(tmp_path / "spill.parquet"), min_frames=WINDOW,
                      n_factors=N_FACTORS, n_mels=N_MELS)


def _by_track(banks):
    out = {}
    for bank in banks:
        for i, t in enumerate(bank.track_ids):
            assert t not in out, f"{t} twice"
            out[t] = (bank.clip(i).clone(), bank.targets[i].clone(), int(bank.items[i]))
    return out


def test_a_shard_within_its_budget_is_one_resident_bank_like_a_plain_one(tmp_path):
    batches = _batches(50)
    clips = _load(batches, _total_bytes(batches), tmp_path)
    plain = ClipBank.from_batches(batches, min_frames=WINDOW, n_factors=N_FACTORS, n_mels=N_MELS)
    assert isinstance(clips, ResidentClips) and clips.held_bytes == _total_bytes(batches)
    assert torch.equal(clips.bank.frames, plain.frames) and torch.equal(clips.bank.offsets, plain.offsets)
    assert torch.equal(clips.bank.targets, plain.targets) and clips.bank.track_ids == plain.track_ids
    fills = list(clips.epoch_fills(steps=7, seed=0))
    assert len(fills) == 1 and fills[0][0] is clips.bank and fills[0][1] == 7
    assert not os.path.exists(tmp_path / "spill.parquet")


def test_beyond_the_budget_every_clip_is_spilled_and_read_back_unchanged(tmp_path):
    batches = _batches(300)
    total = _total_bytes(batches)
    resident = _by_track([_load(batches, total, tmp_path).bank])
    budget = total // 4
    clips = _load(batches, budget, tmp_path)
    assert isinstance(clips, SpilledClips) and len(clips) == 300
    assert clips.held_bytes <= budget  # two fills of half the budget
    streamed = _by_track(clips.banks())
    assert streamed.keys() == resident.keys()
    for t, (clip, target, item) in resident.items():
        s_clip, s_target, s_item = streamed[t]
        assert torch.equal(s_clip, clip) and torch.equal(s_target, target) and s_item == item, t
    clips.close()
    assert not os.path.exists(tmp_path / "spill.parquet")


def test_an_epoch_shares_its_steps_over_shuffled_fills_within_the_fill_size(tmp_path):
    batches = _batches(400, per_batch=10)
    clips = _load(batches, _total_bytes(batches) // 8, tmp_path)
    assert len(clips.group_rows) >= 8, "row groups small enough to shuffle"

    def epoch(seed):
        fills = []
        for bank, steps in clips.epoch_fills(steps=50, seed=seed):
            assert bank.frames.shape[0] * N_MELS * 2 <= max(clips.fill_bytes, max(clips.group_frames) * N_MELS * 2)
            fills.append((list(bank.track_ids), steps))
        return fills

    a, b, again = epoch(1), epoch(2), epoch(1)
    assert sum(s for _, s in a) == 50 and sum(s for _, s in b) == 50
    assert sorted(t for ids, _ in a for t in ids) == sorted(f"TR{i:05d}" for i in range(400))  # every clip, once
    assert a == again and [ids for ids, _ in a] != [ids for ids, _ in b]  # seeded, and new each epoch
    for ids, steps in a:  # a fill's share follows its clips
        assert abs(steps - 50 * len(ids) / 400) < 1
    # windows drawn from a fill are real slices of its clips
    bank, _ = next(clips.epoch_fills(steps=50, seed=3))
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(len(bank))
    windows = bank.random_windows(idx, n_frames=WINDOW, generator=gen)
    for i in range(len(bank)):
        clip = bank.clip(i)
        assert any(torch.equal(windows[i], clip[:, s:s + WINDOW]) for s in range(clip.shape[1] - WINDOW + 1))
    clips.close()


def test_steps_and_budgets_are_shared_exactly():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 50, rng.integers(1, 12)).tolist()
        steps = int(rng.integers(0, 500))
        share = split_steps(steps, sizes)
        assert sum(share) == steps and all(s >= 0 for s in share)
        exact = np.asarray(sizes) * steps / sum(sizes)
        assert np.all(np.abs(np.asarray(share) - exact) < 1)
    assert cache_budgets(1000, train_bytes=900, valid_bytes=100) == {"train": 900, "valid": 100}
    assert sum(cache_budgets(7, train_bytes=1, valid_bytes=0).values()) == 7
    with pytest.raises(ValueError, match="steps"):
        split_steps(3, [])
    assert split_clip_bytes(pa.array([10, None, 200]), n_mels=4, n_factors=3, min_frames=50) == \
        sum(clip_nbytes(n_frames=n, n_mels=4, n_factors=3, min_frames=50) for n in (10, 50, 200))


def test_a_spill_that_cannot_be_written_names_the_file_and_the_settings(tmp_path):
    batches = _batches(60)
    with pytest.raises(TrainingDataError, match=r"missing/spill\.parquet.*train\.spill_dir"):
        load_clips(batches, budget_bytes=_total_bytes(batches) // 4, spill_path=str(tmp_path / "missing" / "spill.parquet"),
                   min_frames=WINDOW, n_factors=N_FACTORS, n_mels=N_MELS)


def test_loading_and_an_epoch_of_a_large_shard_hold_about_the_budget_not_the_shard(tmp_path):
    """In a fresh process: 320 MiB of clips through a 32 MiB budget. The peak resident set grows
    by about the budget (plus one Arrow batch and a row group), not by the shard."""
    script = textwrap.dedent("""
        import resource, sys
        import numpy as np, pyarrow as pa, torch
        from deepcontent.train.clip_cache import load_clips
        n_mels, frames, n = 128, 640, 2048           # 160 KiB a clip, 320 MiB in all
        def batches():
            rng = np.random.default_rng(0)
            for s in range(0, n, 32):
                mel = rng.standard_normal((32, n_mels, frames), dtype=np.float32).astype(np.float16)
                yield pa.table({"track_id": [f"T{i}" for i in range(s, s + 32)],
                                "n_mels": pa.array([n_mels] * 32, pa.int32()), "n_frames": pa.array([frames] * 32, pa.int32()),
                                "mel": pa.array([m.tobytes() for m in mel], pa.binary()),
                                "target": pa.array([[0.0, 1.0]] * 32, pa.list_(pa.float32())),
                                "item_idx": pa.array(range(s, s + 32), pa.int32())})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        clips = load_clips(batches(), budget_bytes=32 * 2**20, spill_path=sys.argv[1], min_frames=130, n_factors=2,
                           n_mels=n_mels)
        seen = 0
        for bank, steps in clips.epoch_fills(steps=100, seed=0):
            seen += len(bank)
            bank.random_windows(torch.arange(len(bank)), n_frames=130, generator=torch.Generator().manual_seed(0))
        assert seen == n, seen
        print(type(clips).__name__, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "spill.parquet")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    kind, grown_mib = out.stdout.split()
    print(f"{kind}: peak RSS grew {float(grown_mib):.0f} MiB for 320 MiB of clips through a 32 MiB budget")
    assert kind == "SpilledClips"
    assert float(grown_mib) < 32 + 48, grown_mib  # budget + one 5 MiB Arrow batch, a row group, allocator slack


def test_a_dead_workers_spill_directory_is_removed_and_a_live_ones_kept(tmp_path):
    from deepcontent.train.loop import SPILL_PREFIX, _sweep_dead_spills

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, live, other = (tmp_path / f"{SPILL_PREFIX}{gone.pid}-x", tmp_path / f"{SPILL_PREFIX}{os.getpid()}-y",
                         tmp_path / "something-else")
    for d in (dead, live, other):
        d.mkdir()
        (d / "train.parquet").write_bytes(b"x")
    _sweep_dead_spills(str(tmp_path))
    assert not dead.exists() and live.exists() and other.exists()
