"""Matrices and factorize stages on a generated catalog: stable ids, honest splits, quarantine,
factors that never see test songs."""

import numpy as np
import pyarrow as pa
import pytest

from deepcontent import datasets
from deepcontent.datasets import load_csr
from deepcontent.interactions.indexing import assign_splits, extend_index
from deepcontent.synth.generate import generate
from support import config_for, run_stage

EXPORTS, ITEM_INDEX, SPLITS, USER_INDEX = (d.key for d in (datasets.EXPORTS, datasets.ITEM_INDEX, datasets.SPLITS,
                                                             datasets.USER_INDEX))
PLAYS, QUARANTINE = datasets.PLAYS.key, datasets.quarantine("matrices").key


def factors_dataset(matrix, kind):
    return datasets.factors(matrix, kind).key


def factors_matrix(table):
    return datasets.vectors(table["factors"])


@pytest.fixture
def catalog(s3_storage, tmp_path, spark):
    cfg = config_for(s3_storage, tmp_path, **{"synth.songs": 120, "synth.users": 800, "synth.audio": "false",
                                               "synth.mismatch_fraction": 0.0, "factorize.factors": 16,
                                               "factorize.num_threads": 1})
    generate(cfg, s3_storage)
    run_stage("ingest", cfg, s3_storage, spark)
    return cfg, s3_storage


def exports(storage):
    base = storage.uri(EXPORTS)
    return {f.rsplit("/", 1)[1]: load_csr(storage, f) for f in storage.published_files(base)}


def test_extend_index_keeps_old_indices_and_appends_new_ids_sorted():
    old = pa.table({"song_id": ["SOB", "SOA"], "idx": pa.array([0, 1], pa.int32())})
    new = extend_index(old, pa.array(["SOC", "SOA", "SO0", "SOC"]), id_column="song_id")
    assert dict(zip(new["song_id"].to_pylist(), new["idx"].to_pylist())) == {"SOB": 0, "SOA": 1, "SO0": 2, "SOC": 3}


def test_splits_are_seeded_hashes_and_artist_level_keeps_artists_whole():
    songs = [f"SO{i:016d}" for i in range(5000)]
    a = assign_splits(songs, seed=1, fractions=(0.8, 0.1, 0.1))
    assert (a == assign_splits(songs, seed=1, fractions=(0.8, 0.1, 0.1))).all()
    assert (a != assign_splits(songs, seed=2, fractions=(0.8, 0.1, 0.1))).any()
    share = {s: np.mean(a == s) for s in ("train", "valid", "test")}
    assert abs(share["train"] - 0.8) < 0.03 and abs(share["test"] - 0.1) < 0.02
    artists = [f"artist{i % 300}" for i in range(5000)]
    b = assign_splits(songs, seed=1, fractions=(0.8, 0.1, 0.1), group_keys=artists)
    for artist in set(artists):
        assert len(set(b[[i for i, x in enumerate(artists) if x == artist]])) == 1
    with pytest.raises(ValueError, match="sum"):
        assign_splits(songs, seed=1, fractions=(0.5, 0.1, 0.1))


def test_matrices_split_exports_and_stable_ids(catalog, spark):
    cfg, storage = catalog
    first = run_stage("matrices", cfg, storage, spark)
    assert first.published
    m = exports(storage)
    splits = storage.read_dataset(storage.uri(SPLITS))
    items = storage.read_dataset(storage.uri(ITEM_INDEX))
    idx_of = dict(zip(items["song_id"].to_pylist(), items["idx"].to_pylist()))
    test_cols = [idx_of[s] for s, sp_ in zip(splits["song_id"].to_pylist(), splits["split"].to_pylist()) if sp_ == "test"]
    assert test_cols, "some songs must be in the test split"
    train = m["user_items_train.npz"].tocsc()
    assert all(train[:, c].nnz == 0 for c in test_cols)  # no test song's plays in the train export
    total = sum(m[f"user_items_{s}.npz"].nnz for s in ("train", "valid", "test"))
    plays = storage.read_dataset(storage.uri(PLAYS))
    assert total == plays.num_rows and m["user_items_train.npz"].sum() + m["user_items_valid.npz"].sum() + m[
        "user_items_test.npz"].sum() == pytest.approx(float(np.sum(plays["play_count"].to_numpy())))
    assert m["item_tags_train.npz"].shape[0] == items.num_rows

    again = run_stage("matrices", cfg, storage, spark)
    assert not again.published

    # New plays by new users for known songs: old ids keep their indices.
    users_before = storage.read_dataset(storage.uri(USER_INDEX))
    extra = pa.table({"user_id": pa.array(["f" * 40, "e" * 40]), "song_id": plays["song_id"][:2], "play_count": pa.array([3, 4], pa.int32())})
    _append_plays(storage, extra)
    run_stage("matrices", cfg, storage, spark)
    users_after = storage.read_dataset(storage.uri(USER_INDEX))
    before = dict(zip(users_before["user_id"].to_pylist(), users_before["idx"].to_pylist()))
    after = dict(zip(users_after["user_id"].to_pylist(), users_after["idx"].to_pylist()))
    assert all(after[u] == i for u, i in before.items())
    assert after["e" * 40] == len(before) and after["f" * 40] == len(before) + 1


def _append_plays(storage, table):
    """Publish an extra part into canonical plays (stands in for a later ingest of new logs)."""
    ds = storage.uri(PLAYS)
    pointer = storage.published(ds)
    extra = f"{storage.staging_uri(ds, 'manual-extra')}/part-extra.parquet"
    storage.write_parquet(table, extra)
    storage.publish(ds, run_id="manual-extra", files=storage.published_files(ds) + [extra],
                    meta={k: v for k, v in pointer.items() if k not in ("files", "run_id", "published_at")})


def test_bad_counts_and_unknown_songs_are_quarantined_not_factorised(catalog, spark):
    cfg, storage = catalog
    plays = storage.read_dataset(storage.uri(PLAYS))
    song = plays["song_id"][0].as_py()
    bad = pa.table({
        "user_id": pa.array(["a" * 40] * 4),
        "song_id": pa.array([song, song, song, "SONOTINTHECATALOG0"]),
        "play_count": pa.array([0, -5, 2_000_000, 3], pa.int32()),
    })
    _append_plays(storage, bad)
    run_stage("matrices", cfg, storage, spark)
    q = storage.read_dataset(storage.uri(QUARANTINE))
    assert sorted(q["reason"].to_pylist()) == ["absurd_count", "nonpositive_count", "nonpositive_count", "unknown_song"]
    assert all("part-extra.parquet#row=" in s for s in q["source"].to_pylist())
    m = exports(storage)
    assert sum(m[f"user_items_{s}.npz"].nnz for s in ("train", "valid", "test")) == plays.num_rows
    assert max(m[f"user_items_{s}.npz"].max() for s in ("train", "valid", "test")) < 2_000_000


@pytest.mark.parametrize("backend", ["implicit", "spark"])
def test_factorize_publishes_train_and_valid_songs_only(catalog, spark, backend):
    cfg, storage = catalog
    cfg.factorize.backend = backend
    run_stage("matrices", cfg, storage, spark)
    result = run_stage("factorize", cfg, storage, spark)
    items = storage.read_dataset(storage.uri(factors_dataset("plays", "item_factors")))
    splits = storage.read_dataset(storage.uri(SPLITS))
    split_of = dict(zip(splits["song_id"].to_pylist(), splits["split"].to_pylist()))
    assert {split_of[s] for s in items["song_id"].to_pylist()} <= {"train", "valid"}
    assert set(items["split"].to_pylist()) == {"train", "valid"}
    f = factors_matrix(items)
    assert f.shape == (items.num_rows, 16) and np.isfinite(f).all()
    users = storage.read_dataset(storage.uri(factors_dataset("plays", "user_factors")))
    assert users.num_rows == result.counts["user_ids"] > 0
    assert not run_stage("factorize", cfg, storage, spark).published  # nothing new


def test_tag_factors(catalog, spark):
    cfg, storage = catalog
    run_stage("matrices", cfg, storage, spark)
    cfg.factorize.matrices = ("tags",)
    run_stage("factorize", cfg, storage)
    tags = storage.read_dataset(storage.uri(factors_dataset("tags", "tag_factors")))
    songs = storage.read_dataset(storage.uri(factors_dataset("tags", "item_factors")))
    assert tags.num_rows > 5 and songs.num_rows > 20
    assert factors_matrix(tags).shape[1] == cfg.factorize.factors  # tag_factors unset: the same count
    # the tag WMF may have a size of its own; a new size is a new fit
    cfg.factorize.tag_factors = 3
    assert run_stage("factorize", cfg, storage).published
    tags = storage.read_dataset(storage.uri(factors_dataset("tags", "tag_factors")))
    songs = storage.read_dataset(storage.uri(factors_dataset("tags", "item_factors")))
    assert factors_matrix(tags).shape[1] == 3 and factors_matrix(songs).shape[1] == 3


def test_a_catalog_without_tags_still_builds_matrices(s3_storage, tmp_path, spark):
    cfg = config_for(s3_storage, tmp_path, **{"synth.songs": 40, "synth.users": 200, "synth.audio": "false",
                                               "synth.lastfm_format": "none"})
    generate(cfg, s3_storage)
    run_stage("ingest", cfg, s3_storage, spark)
    run_stage("matrices", cfg, s3_storage, spark)
    m = exports(s3_storage)
    assert m["item_tags_train.npz"].shape[1] == 0 and m["user_items_train.npz"].nnz > 0
