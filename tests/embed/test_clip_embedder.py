"""The embed worker without Ray: read the pending clips of a shard, infer, stage one file;
non-finite outputs are marked, never written as vectors."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepcontent.embed.inference import STAGED_SCHEMA, ClipEmbedder, work_items
from deepcontent.embed.pooling import clip_outputs
from deepcontent.models.factory import build_model
from deepcontent.datasets import SPECTROGRAM_SCHEMA
from deepcontent.registry import ARTIFACT_FORMAT, load_model, register

N_MELS, WINDOW, F = 16, 60, 3


@pytest.fixture
def registered_model(file_storage):
    torch.manual_seed(0)
    params = {"n_mels": N_MELS, "n_frames": WINDOW}
    model = build_model("paper_cnn", n_factors=F, **params)
    artifact = {"format": ARTIFACT_FORMAT, "model_version": "paper_cnn-test", "model": "paper_cnn", "model_params": params,
                "n_factors": F, "n_mels": N_MELS, "window_frames": WINDOW, "target_mean": [0.5, -1.0, 2.0],
                "target_std": [1.0, 2.0, 0.5], "state_dict": model.state_dict(), "spectrograms": {"settings_key": "k"}}
    register(file_storage, version="paper_cnn-test", artifact=artifact, metadata={"metrics": {}}, promote=False)
    return file_storage, "paper_cnn-test"


def _shard(storage, n_clips, *, nan_clip=None):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n_clips):
        mel = rng.standard_normal((N_MELS, 70 + 13 * i)).astype(np.float16)
        if i == nan_clip:
            mel[:, 5] = np.nan
        rows.append({"track_id": f"T{i:03d}", "audio_sha256": f"h{i}", "sample_rate": 22050, "hop_length": 512,
                     "n_mels": N_MELS, "n_frames": mel.shape[1], "mel": mel.tobytes(), "harmonic": None,
                     "percussive": None, "settings_key": "k"})
    uri = storage.uri("features/spectrograms/data/r1/part-00000.parquet")
    storage.write_parquet(pa.Table.from_pylist(rows, schema=SPECTROGRAM_SCHEMA), uri, row_group_size=4)
    return uri, rows


def test_pending_clips_are_embedded_into_one_staged_file(registered_model):
    storage, version = registered_model
    uri, rows = _shard(storage, 10)
    todo = [r for r in rows if r["track_id"] not in ("T001", "T007")]  # two are already embedded
    worker = ClipEmbedder(storage=storage, model_version=version, staging_uri=storage.uri("embeddings/staging/r2"),
                          clips_per_forward_batch=3)
    at = [int(r["track_id"][1:]) for r in todo]
    items = work_items(pa.table({"uri": [uri] * len(todo), "row_group": [i // 4 for i in at], "row": [i % 4 for i in at]}),
                       clips_per_item=100)
    assert items == [{"uri": uri, "row_groups": [0, 1, 2], "rows": [[0, 2, 3], [0, 1, 2], [0, 1]]}]
    out = worker(pa.Table.from_pylist(items)).to_pylist()
    assert len(out) == 1 and out[0]["rows"] == 8 and out[0]["ok"] == 8
    staged = storage.read_parquet(out[0]["file"])
    assert staged.schema.equals(STAGED_SCHEMA)
    assert staged["track_id"].to_pylist() == [r["track_id"] for r in todo]

    model, art = load_model(storage, version)
    clips = [np.frombuffer(r["mel"], np.float16).reshape(N_MELS, r["n_frames"]) for r in todo]
    pred, emb = clip_outputs(model, clips, n_frames=WINDOW, target_mean=art["target_mean"], target_std=art["target_std"])
    np.testing.assert_allclose(np.array(staged["predicted_factors"].to_pylist()), pred, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(staged["embedding"].to_pylist()), emb, rtol=1e-4, atol=1e-5)


def test_a_clip_with_nan_frames_is_marked_non_finite(registered_model):
    storage, version = registered_model
    uri, rows = _shard(storage, 5, nan_clip=2)
    worker = ClipEmbedder(storage=storage, model_version=version, staging_uri=storage.uri("st"))
    out = worker(pa.Table.from_pylist([{"uri": uri, "row_groups": [0, 1], "rows": [[0, 1, 2, 3], [0]]}])).to_pylist()
    assert out[0]["rows"] == 5 and out[0]["ok"] == 4
    staged = storage.read_parquet(out[0]["file"])
    bad = staged.filter(pa.compute.equal(staged["status"], "non_finite"))
    assert bad["track_id"].to_pylist() == ["T002"] and bad["predicted_factors"].to_pylist() == [None]


def test_bf16_on_cpu_is_refused(registered_model):
    storage, version = registered_model
    with pytest.raises(ValueError, match="use_gpu=true"):
        ClipEmbedder(storage=storage, model_version=version, staging_uri="x", precision="bf16")
