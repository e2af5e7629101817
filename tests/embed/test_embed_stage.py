"""The embed stage's fixed costs, in process (no Ray): the plan reads each shard once and knows
every clip's row group and position; work items select clips by position; the commit hands the
upsert a few large parts, so a run of many staged files still writes one data file per
partition it touches; a nightly embeds exactly the changed and new clips of a shard, with the
same vectors as the straightforward per-clip path."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from deepcontent.config import load_config
from deepcontent.datasets import SPECTROGRAM_SCHEMA, SPECTROGRAMS, TRACK_BUCKETS, mel_arrays, vectors
from deepcontent.embed.inference import read_item_clips, work_items
from deepcontent.models.factory import build_model
from deepcontent.registry import ARTIFACT_FORMAT, load_model, register
from deepcontent.stages import StageContext, run_stage
from deepcontent.stages.embed import clips_per_item, spectrogram_pairs
from deepcontent.storage import Storage

from test_batched_path import per_clip_reference  # the per-clip path the stage used before

N_MELS, WINDOW, F, GROUP = 16, 60, 3, 8


def shard_rows(ids, *, audio: str, seed: int, lengths=None) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for k, i in enumerate(ids):
        t = 128 if lengths is None else lengths[k]
        mel = rng.standard_normal((N_MELS, t)).astype(np.float16)
        rows.append({"track_id": f"T{i:04d}", "audio_sha256": f"{audio}{i}", "sample_rate": 22050, "hop_length": 512,
                     "n_mels": N_MELS, "n_frames": t, "mel": mel.tobytes(), "harmonic": None, "percussive": None,
                     "settings_key": "k"})
    return pa.Table.from_pylist(rows, schema=SPECTROGRAM_SCHEMA)


@pytest.fixture
def deployment(tmp_path, torch_one_thread):
    storage = Storage(f"file://{tmp_path}/store")
    storage.ensure_root()
    cfg = load_config(None, environ={}, overrides=[
        f"storage.root={storage.root}", "storage.embedded_s3=false", f"warehouse.uri=sqlite:///{tmp_path}/catalog.db",
        "storage.sweep_grace_s=0", "embed.in_process_max_clips=100000", "embed.clips_per_batch=8", "embed.actors=2"])
    torch.manual_seed(0)
    params = {"n_mels": N_MELS, "n_frames": WINDOW}
    model = build_model("paper_cnn", n_factors=F, **params)
    register(storage, version="v1", artifact={
        "format": ARTIFACT_FORMAT, "model_version": "v1", "model": "paper_cnn", "model_params": params, "n_factors": F,
        "n_mels": N_MELS, "window_frames": WINDOW, "target_mean": [0.5, -1.0, 2.0], "target_std": [1.0, 2.0, 0.5],
        "state_dict": model.state_dict(), "spectrograms": {"settings_key": "k"}}, metadata={"metrics": {}}, promote=True)
    ctx = StageContext(cfg, storage)
    try:
        yield cfg, storage, ctx
    finally:
        ctx.close()


def publish(storage, tables: dict[str, pa.Table], *, run: str) -> list[str]:
    files = []
    for name, t in tables.items():
        uri = storage.uri(SPECTROGRAMS.key, "data", run, name)
        storage.write_parquet(t, uri, row_group_size=GROUP)
        files.append(uri)
    return files


def reference(storage, table: pa.Table, *, batch: int) -> dict[str, np.ndarray]:
    """Per track, predicted factors and embedding side by side, from the per-clip path run on
    ``batch`` clips at a time (the clips that share a forward pass can move the last bit)."""
    model, art = load_model(storage, "v1")
    out = {}
    for s in range(0, table.num_rows, batch):
        part = table.slice(s, batch)
        pred, emb = per_clip_reference(model.eval(), mel_arrays(part, copy=True), n_frames=WINDOW,
                                       mean=art["target_mean"], std=art["target_std"], windows_per_forward=256)
        out.update(zip(part["track_id"].to_pylist(), np.hstack([pred, emb])))
    return out


def stored(ctx) -> dict[str, np.ndarray]:
    t = ctx.warehouse.read("embeddings")
    both = np.hstack([vectors(t["predicted_factors"]), vectors(t["embedding"])])
    return dict(zip(t["track_id"].to_pylist(), both))


def test_the_plan_knows_each_clips_row_group_and_position(deployment):
    _, storage, _ = deployment
    a, b = shard_rows(range(20), audio="a", seed=0), shard_rows(range(20, 23), audio="a", seed=1)
    files = publish(storage, {"part-0.parquet": a, "part-1.parquet": b}, run="r0")
    storage.publish(storage.uri(SPECTROGRAMS.key), run_id="r0", files=files)
    pairs = spectrogram_pairs(storage, threads=2)
    assert pairs["track_id"].to_pylist() == [f"T{i:04d}" for i in range(23)]
    assert pairs["uri"].to_pylist() == [files[0]] * 20 + [files[1]] * 3
    assert pairs["row_group"].to_pylist() == [i // GROUP for i in range(20)] + [0, 0, 0]
    assert pairs["row"].to_pylist() == [i % GROUP for i in range(20)] + [0, 1, 2]
    # An item's positions select exactly its clips, a partial row group by position.
    pending = pairs.filter(pa.array([i % 3 != 1 for i in range(23)]))
    items = work_items(pending, clips_per_item=100)
    got = [t for item in items for t in read_item_clips(item, storage=storage)]
    assert pa.concat_tables(got)["track_id"].to_pylist() == pending["track_id"].to_pylist()
    with pytest.raises(ValueError, match="row group 0 has 8 rows, the work item names row 9"):
        list(read_item_clips({"uri": files[0], "row_groups": [0], "rows": [[1, 9]]}, storage=storage))


def test_items_grow_with_the_run_between_a_batch_and_a_shard():
    assert clips_per_item(10, actors=2, clips_per_batch=32) == 32
    assert clips_per_item(2_000, actors=2, clips_per_batch=32) == 125
    assert clips_per_item(10_000_000, actors=4, clips_per_batch=32) == 4096


def test_many_staged_files_commit_as_one_data_file_per_partition(deployment):
    cfg, storage, ctx = deployment
    table = shard_rows(range(240), audio="a", seed=0, lengths=[128] * 100 + [50, 61, 300] * 20 + [128] * 80)
    files = publish(storage, {"part-0.parquet": table.slice(0, 120), "part-1.parquet": table.slice(120)}, run="r0")
    storage.publish(storage.uri(SPECTROGRAMS.key), run_id="r0", files=files)
    result = run_stage("embed", cfg, ctx)
    assert result.counts["embedded"] == 240
    # Bit-identical to the per-clip path: every batch is one row group of GROUP clips here.
    got, want = stored(ctx), reference(storage, table, batch=GROUP)
    assert sorted(got) == sorted(want)
    assert all(got[t].tobytes() == want[t].tobytes() for t in want)
    # 240 clips, 2 actors: items of one or two row groups -> 16 staged files. One part for the upsert
    # writes one data file per bucket; a part per staged file wrote up to 16 per staged file.
    data_files = list(ctx.warehouse.table("embeddings").scan().plan_files())
    assert len(data_files) <= TRACK_BUCKETS


def test_a_nightly_embeds_the_changed_and_new_clips_of_partly_embedded_row_groups(deployment):
    cfg, storage, ctx = deployment
    first = shard_rows(range(40), audio="a", seed=0)
    files = publish(storage, {"part-0.parquet": first}, run="r0")
    storage.publish(storage.uri(SPECTROGRAMS.key), run_id="r0", files=files)
    run_stage("embed", cfg, ctx)
    # One shard interleaves unchanged rows, changed audio and new tracks in the same row groups.
    ids = list(range(30, 50))
    audio = [("b" if i % 2 else "a") if i < 40 else "a" for i in ids]
    mixed = pa.concat_tables([shard_rows([i], audio=a, seed=100 + i) for i, a in zip(ids, audio)])
    mixed = mixed.set_column(1, "audio_sha256", pa.array([f"{a}{i}" for i, a in zip(ids, audio)]))
    files2 = publish(storage, {"part-1.parquet": mixed}, run="r1")
    # Tracks 0-29 keep their first audio; 30-39 also appear in part-1 (half of them changed).
    storage.publish(storage.uri(SPECTROGRAMS.key), run_id="r1", files=files + files2)
    result = run_stage("embed", cfg, ctx)
    changed = [i for i in ids if i < 40 and i % 2]
    assert result.counts["changed"] == len(changed) and result.counts["new"] == 10
    want = reference(storage, first, batch=GROUP)
    pending = mixed.filter(pa.array([a == "b" or i >= 40 for i, a in zip(ids, audio)]))
    want.update(reference(storage, pending, batch=GROUP))
    got = stored(ctx)
    assert sorted(got) == sorted(want)
    # The nightly's batches are the pending rows of a row group or two: equal up to the last bit.
    np.testing.assert_allclose(np.array([got[t] for t in want]), np.array(list(want.values())), rtol=1e-6, atol=1e-7)


def test_the_ray_actors_on_s3_stage_what_the_driver_would(s3_storage, tmp_path, torch_one_thread):
    """The Ray Data path end to end on object storage: actors read the shards by position and
    stage uncompressed files the commit reads once; the table is what the in-process path gives."""
    storage = s3_storage
    cfg = load_config(None, environ={}, overrides=[
        f"storage.root={storage.root}", "storage.embedded_s3=false", f"warehouse.uri=sqlite:///{tmp_path}/catalog.db",
        "storage.sweep_grace_s=0", "embed.in_process_max_clips=0", "embed.clips_per_batch=8", "embed.actors=2"])
    torch.manual_seed(0)
    params = {"n_mels": N_MELS, "n_frames": WINDOW}
    register(storage, version="v1", artifact={
        "format": ARTIFACT_FORMAT, "model_version": "v1", "model": "paper_cnn", "model_params": params, "n_factors": F,
        "n_mels": N_MELS, "window_frames": WINDOW, "target_mean": [0.5, -1.0, 2.0], "target_std": [1.0, 2.0, 0.5],
        "state_dict": build_model("paper_cnn", n_factors=F, **params).state_dict(), "spectrograms": {"settings_key": "k"}},
        metadata={"metrics": {}}, promote=True)
    table = shard_rows(range(96), audio="a", seed=0, lengths=[128] * 40 + [50, 61, 300] * 8 + [128] * 32)
    files = publish(storage, {"part-0.parquet": table.slice(0, 48), "part-1.parquet": table.slice(48)}, run="r0")
    storage.publish(storage.uri(SPECTROGRAMS.key), run_id="r0", files=files)
    ctx = StageContext(cfg, storage)
    try:
        result = run_stage("embed", cfg, ctx)
        assert result.counts["embedded"] == 96 and result.published
        got, want = stored(ctx), reference(storage, table, batch=GROUP)
        assert sorted(got) == sorted(want) and all(got[t].tobytes() == want[t].tobytes() for t in want)
        assert not storage.list(storage.uri("embeddings/staging"))  # swept after the commit
    finally:
        ctx.close()
