"""The embed actors' per-clip path without copies or per-clip Python: Arrow blobs -> float16
blocks that view the Arrow buffer -> windows cut per block -> the model -> Arrow lists wrapped
around the output arrays. Whatever the clip lengths, the outputs must be bit-identical to the
straightforward per-clip path (one ``consecutive_windows`` and one copy per clip, ``tolist()``
into Arrow) that the stage used before."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepcontent.datasets import SPECTROGRAM_SCHEMA, mel_arrays, mel_blocks
from deepcontent.embed.inference import STAGED_SCHEMA, staged_rows
from deepcontent.embed.pooling import clip_outputs, clip_windows, windows_per_clip
from deepcontent.models.augment import consecutive_windows
from deepcontent.models.factory import build_model

N_MELS, WINDOW = 16, 60
# Shorter than a window, exact multiples, a frame over and under, a long tail, repeated runs.
LENGTHS = [128, 128, 128, 1, 59, 60, 61, 119, 120, 121, 500, 128, 128, 30, 30, 200, 200, 128]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("paper_cnn", n_factors=5, n_mels=N_MELS, n_frames=WINDOW).eval()


def spectrogram_rows(lengths, *, seed=0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for i, t in enumerate(lengths):
        mel = rng.standard_normal((N_MELS, t)).astype(np.float16)
        rows.append({"track_id": f"T{i:03d}", "audio_sha256": f"h{i}", "sample_rate": 22050, "hop_length": 512,
                     "n_mels": N_MELS, "n_frames": t, "mel": mel.tobytes(), "harmonic": None, "percussive": None,
                     "settings_key": "k"})
    return pa.Table.from_pylist(rows, schema=SPECTROGRAM_SCHEMA)


@torch.no_grad()
def per_clip_reference(model, clips, *, n_frames, mean, std, windows_per_forward):
    """The embed stage's path before blocks, kept verbatim as the reference."""
    windows = [consecutive_windows(torch.as_tensor(np.array(c)), n_frames=n_frames, cover_tail=True) for c in clips]
    counts = torch.as_tensor([w.shape[0] for w in windows], dtype=torch.float32)
    owner = torch.repeat_interleave(torch.arange(len(clips)), counts.long())
    flat = torch.cat(windows)
    preds, embs = [], []
    for s in range(0, flat.shape[0], windows_per_forward):
        p, e = model(flat[s:s + windows_per_forward].to(dtype=torch.float32), return_embedding=True)
        preds.append(p.float())
        embs.append(e.float())
    pred, emb = torch.cat(preds), torch.cat(embs)
    pred = (torch.zeros((len(clips), pred.shape[1])).index_add_(0, owner, pred) / counts[:, None]).numpy()
    emb = (torch.zeros((len(clips), emb.shape[1])).index_add_(0, owner, emb) / counts[:, None]).numpy()
    std, mean = np.asarray(std, np.float32), np.asarray(mean, np.float32)
    return (pred * std + mean).astype(np.float32), emb.astype(np.float32)


# --------------------------------------------------------------------------- mel_blocks
def test_mel_blocks_are_views_of_the_arrow_buffer_one_per_run_of_equal_lengths():
    table = spectrogram_rows(LENGTHS)
    blocks = mel_blocks(table)
    assert [b.shape[0] for b in blocks] == [3, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 1]  # runs of equal lengths
    assert all(b.dtype == np.float16 and not b.flags.writeable and b.flags.c_contiguous for b in blocks)
    data = table["mel"].chunks[0].buffers()[2]
    assert all(data.address <= b.ctypes.data < data.address + data.size for b in blocks)  # no copy
    # Same values as the per-row helper, in row order.
    flat = [c for b in blocks for c in b]
    assert len(flat) == table.num_rows
    for a, b in zip(flat, mel_arrays(table)):
        assert a.shape == b.shape and a.tobytes() == b.tobytes()


def test_mel_blocks_never_cross_chunks_and_accept_sliced_columns():
    table = pa.concat_tables([spectrogram_rows([128] * 3, seed=1), spectrogram_rows([128] * 2, seed=2)])
    assert [b.shape[0] for b in mel_blocks(table)] == [3, 2]
    sliced = table.slice(1, 3)
    got = [c.tobytes() for b in mel_blocks(sliced) for c in b]
    assert got == [m.tobytes() for m in mel_arrays(sliced)]


def test_mel_blocks_name_the_track_of_a_bad_blob():
    table = spectrogram_rows([64, 64, 64])
    sizes = table["n_frames"].to_pylist()
    sizes[1] = 65
    with pytest.raises(ValueError, match=r"track 'T001': mel blob holds 1024 values, expected .* 16 × 65 = 1040"):
        mel_blocks(table.set_column(table.schema.get_field_index("n_frames"), "n_frames", pa.array(sizes, pa.int32())))
    blobs = table["mel"].to_pylist()
    blobs[2] = None
    with pytest.raises(ValueError, match="track 'T002': no mel values stored"):
        mel_blocks(table.set_column(table.schema.get_field_index("mel"), "mel", pa.array(blobs, pa.binary())))


# --------------------------------------------------------------------------- windows and outputs
def test_clip_windows_equal_consecutive_windows_per_clip_for_any_length():
    table = spectrogram_rows(LENGTHS)
    clips = mel_arrays(table)
    expected = torch.cat([consecutive_windows(torch.as_tensor(np.array(c)), n_frames=WINDOW, cover_tail=True)
                          for c in clips]).numpy()
    for given in (mel_blocks(table), clips):
        windows, counts = clip_windows(given, n_frames=WINDOW)
        assert windows.dtype == np.float16 and windows.flags.c_contiguous
        assert windows.tobytes() == expected.tobytes()
        assert counts.tolist() == [windows_per_clip(t, n_frames=WINDOW) for t in LENGTHS]
    assert [windows_per_clip(t, n_frames=60) for t in (0, 59, 60, 61, 120, 121)] == [1, 1, 1, 2, 2, 3]


def test_clip_windows_refuse_mixed_bands_and_bad_shapes():
    with pytest.raises(ValueError, match=r"clips\[1\] has 8 mel bands, clips\[0\] has 16"):
        clip_windows([np.zeros((16, 70), np.float16), np.zeros((8, 70), np.float16)], n_frames=WINDOW)
    with pytest.raises(ValueError, match=r"clips\[0\] must be one clip .* got shape \(70,\)"):
        clip_windows([np.zeros(70, np.float16)], n_frames=WINDOW)


@pytest.mark.parametrize("windows_per_forward", [7, 256])
def test_block_outputs_are_bit_identical_to_the_per_clip_reference(model, windows_per_forward, torch_one_thread):
    table = spectrogram_rows(LENGTHS)
    mean, std = np.array([1.0, -2.0, 0.5, 0.0, 3.0]), np.array([2.0, 1.0, 0.5, 3.0, 0.1])
    kw = {"n_frames": WINDOW, "target_mean": mean, "target_std": std, "windows_per_forward": windows_per_forward}
    ref_pred, ref_emb = per_clip_reference(model, mel_arrays(table, copy=True), n_frames=WINDOW, mean=mean, std=std,
                                           windows_per_forward=windows_per_forward)
    pred, emb = clip_outputs(model, mel_blocks(table), **kw)
    assert pred.tobytes() == ref_pred.tobytes() and emb.tobytes() == ref_emb.tobytes()
    pred, emb = clip_outputs(model, mel_arrays(table), **kw)  # one read-only view per clip: no copy needed
    assert pred.tobytes() == ref_pred.tobytes() and emb.tobytes() == ref_emb.tobytes()


# --------------------------------------------------------------------------- staged rows
def test_staged_rows_wrap_the_output_arrays_and_null_the_non_finite():
    rng = np.random.default_rng(0)
    pred, emb = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    pred[1, 2], emb[3, 0] = np.nan, np.inf
    t = staged_rows(track_id=pa.array(["a", "b", "c", "d"]), audio_sha256=pa.array(["1", "2", "3", "4"]),
                    predicted_factors=pred, embedding=emb)
    assert t.schema.equals(STAGED_SCHEMA)
    assert t["status"].to_pylist() == ["ok", "non_finite", "ok", "non_finite"]
    assert t["predicted_factors"].to_pylist()[1] is None and t["embedding"].to_pylist()[3] is None
    # The same float32 values the tolist() path gave, bit for bit.
    for col, m in (("predicted_factors", pred), ("embedding", emb)):
        got = t[col].to_pylist()
        for i in (0, 2):
            assert np.asarray(got[i], np.float32).tobytes() == m[i].tobytes()
    with pytest.raises(ValueError, match="4 track ids, 4 audio hashes, 2 predicted factor rows"):
        staged_rows(track_id=pa.array(["a", "b", "c", "d"]), audio_sha256=pa.array(["1", "2", "3", "4"]),
                    predicted_factors=pred[:2], embedding=emb)
