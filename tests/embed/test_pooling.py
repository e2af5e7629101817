"""Clip-level outputs: the mean of per-window outputs, back in WMF units; work splitting."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepcontent.embed.inference import work_items
from deepcontent.embed.pooling import clip_outputs
from deepcontent.models.augment import consecutive_windows
from deepcontent.models.factory import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("paper_cnn", n_factors=4, n_mels=16, n_frames=60).eval()


def test_clip_outputs_average_the_windows_and_unstandardise(model):
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal((16, n)).astype(np.float16) for n in (60, 95, 190, 17)]
    mean, std = np.array([1.0, -2.0, 0.5, 0.0]), np.array([2.0, 1.0, 0.5, 3.0])
    pred, emb = clip_outputs(model, clips, n_frames=60, target_mean=mean, target_std=std, windows_per_forward=3)
    assert pred.shape == (4, 4) and emb.shape == (4, model.embedding_dim) and pred.dtype == np.float32
    for i, c in enumerate(clips):
        w = consecutive_windows(torch.from_numpy(c.astype(np.float32)), n_frames=60, cover_tail=True)
        with torch.no_grad():
            p, e = model(w, return_embedding=True)
        np.testing.assert_allclose(pred[i], p.mean(0).numpy() * std + mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(emb[i], e.mean(0).numpy(), rtol=1e-4, atol=1e-5)
    # the batching of windows does not change anything
    pred2, emb2 = clip_outputs(model, clips, n_frames=60, target_mean=mean, target_std=std, windows_per_forward=1000)
    np.testing.assert_allclose(pred, pred2, rtol=1e-5, atol=1e-6)


def test_clip_outputs_refuse_bad_input(model):
    with pytest.raises(ValueError, match="no clips"):
        clip_outputs(model, [], n_frames=60, target_mean=np.zeros(4), target_std=np.ones(4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        clip_outputs(model, [np.zeros((16, 50), np.float16)], n_frames=60, target_mean=np.zeros(3), target_std=np.ones(3))


def test_work_items_split_by_row_group_and_keep_every_clip():
    pending = pa.table({"uri": ["b"] * 3 + ["a"] * 20, "row_group": [1, 0, 0] + [g // 8 for g in range(20)],
                        "row": [5, 7, 2] + [g % 8 for g in range(20)]})
    items = work_items(pending, clips_per_item=8)
    r8 = list(range(8))
    assert items == [{"uri": "a", "row_groups": [0], "rows": [r8]}, {"uri": "a", "row_groups": [1], "rows": [r8]},
                     {"uri": "a", "row_groups": [2], "rows": [[0, 1, 2, 3]]},
                     {"uri": "b", "row_groups": [0, 1], "rows": [[2, 7], [5]]}]
    assert work_items(pending, clips_per_item=100) == [
        {"uri": "a", "row_groups": [0, 1, 2], "rows": [r8, r8, [0, 1, 2, 3]]},
        {"uri": "b", "row_groups": [0, 1], "rows": [[2, 7], [5]]}]
    assert work_items(pending.slice(0, 0), clips_per_item=8) == []


def test_work_items_of_a_shard_are_of_equal_size_not_full_ones_and_a_leftover():
    pending = pa.table({"uri": ["s"] * 4096, "row_group": np.arange(4096) // 256, "row": np.arange(4096) % 256})
    items = work_items(pending, clips_per_item=3125)
    assert [it["row_groups"] for it in items] == [list(range(8)), list(range(8, 16))]
    sizes = [sum(map(len, it["rows"])) for it in work_items(pending, clips_per_item=1000)]
    assert len(sizes) == 5 and sum(sizes) == 4096 and max(sizes) - min(sizes) <= 256  # within a row group
