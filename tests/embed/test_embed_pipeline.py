"""The whole product as a user runs it: ``deepcontent pipeline`` on the embedded default (S3
server, Spark, Ray, Iceberg in SQLite), then ``nightly`` re-runs, new tracks, and an embed run
killed before its commit. Everything goes through the CLI in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from deepcontent.config import load_config
from deepcontent.evaluate.metrics import cutoff_name

CLI = [sys.executable, "-m", "deepcontent.cli"]
# Small but complete: train two quick epochs so that a model is registered; every embed run
# goes through Ray Data actors (the in-process path for a handful of clips has its own test).
SETTINGS = ["synth.songs=60", "synth.users=600", "synth.clip_seconds=5", "synth.audio_format=wav",
            "spark.master=local[2]", "factorize.factors=8",
            "train.epochs=2", "train.batch_size=16", "neighbors.k=5", "evaluate.mlp_epochs=5", "embed.in_process_max_clips=0",
            "evaluate.kmeans_centroids=16", "synth.lastfm_format=both", "synth.dangling_tag_rows=2",
            # small GTZAN- and MTAT-layout target sets (two "artists" of two clips per genre), transfer under
            # both protocols with late fusion, and every CNN variant among the methods
            "synth.gtzan_per_genre=4", "synth.gtzan_clips_per_artist=2", "synth.mtat_clips=24",
            "evaluate.transfer_folds=2", "evaluate.late_fusion=true", "transfer.inner_folds=2",
            "transfer.grouped_folds=2", "transfer.max_logo_groups=4",
            "evaluate.methods=[random,bow_linear,bow_mlp,kmeans_linear,cnn_mse,cnn_wpe,deep_cnn,raw_cnn,upper_bound]"]
COLD_START_METHODS = ("random", "bow_linear", "bow_mlp", "kmeans_linear", "cnn_mse", "cnn_wpe", "deep_cnn", "raw_cnn",
                      "upper_bound")


def cli(args, cwd, timeout=900):
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return out


def last_json(out):
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextmanager
def warehouse(workdir: Path):
    """The embedded default's Iceberg catalog, opened the way the CLI opens it."""
    from deepcontent.engines.s3server import EmbeddedS3Server
    from deepcontent.storage import Storage
    from deepcontent.warehouse import Warehouse

    cfg = load_config(None, environ={})
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with EmbeddedS3Server(workdir / ".deepcontent" / "s3") as server:
            storage = Storage("s3://deepcontent", endpoint_url=server.endpoint_url, credentials=server.credentials)
            with Warehouse.from_config(cfg.warehouse, storage) as wh:
                yield wh
    finally:
        os.chdir(cwd)


def add_tracks(workdir: Path, n: int, *, tag: str) -> list[str]:
    """Put ``n`` new tracks in the raw catalog as a label would: audio files in the MSD-style
    folders and lines appended to unique_tracks.txt."""
    from deepcontent.synth.attributes import GENRES, sample_attributes
    from deepcontent.synth.audio import encode_audio, render_clip

    raw = workdir / ".deepcontent" / "s3" / "deepcontent" / "raw"
    rng = np.random.default_rng(len(tag))
    ids, lines = [], []
    for i in range(n):
        track_id = f"TRZZZ{tag}{i:08d}"[:18]
        audio = render_clip(sample_attributes(GENRES[i % len(GENRES)], rng), seconds=5.0, sample_rate=44100, seed=1000 + i)
        path = raw / "audio" / track_id[2] / track_id[3] / track_id[4] / f"{track_id}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_audio(audio, sample_rate=44100, fmt="wav"))
        lines.append(f"{track_id}<SEP>SOZZZ{tag}{i:08d}<SEP>New Artist {tag}<SEP>New Song {i}\n")
        ids.append(track_id)
    with open(raw / "msd" / "unique_tracks.txt", "a") as f:
        f.writelines(lines)
    return ids


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    result = last_json(cli(["pipeline", "--json", *SETTINGS], workdir))
    return workdir, result


def test_pipeline_publishes_one_embedding_and_k_neighbours_per_track(demo):
    workdir, result = demo
    tracks = result["spectrograms"]["counts"]["computed"]
    version = result["train"]["model_version"]
    assert result["embed"]["published"] and result["embed"]["counts"]["embedded"] == tracks
    with warehouse(workdir) as wh:
        emb = wh.read("embeddings")
        assert emb.num_rows == tracks and len(set(emb["track_id"].to_pylist())) == tracks
        assert set(emb["model_version"].to_pylist()) == {version}
        assert set(emb["track_id"].to_pylist()) == set(wh.read("tracks")["track_id"].to_pylist())
        factors = np.array(emb["predicted_factors"].to_pylist())
        assert factors.shape == (tracks, 8) and np.isfinite(factors).all()
        assert len(emb["embedding"][0]) == 400  # the paper CNN's penultimate layer
        sim = wh.read("similar_tracks")
        assert sim.num_rows == tracks * 5
        per_track = sim.group_by("track_id").aggregate([("rank", "count"), ("rank", "max")])
        assert set(per_track["rank_count"].to_pylist()) == {5} and set(per_track["rank_max"].to_pylist()) == {5}
        assert not pc.any(pc.equal(sim["track_id"], sim["neighbor_track_id"])).as_py()


def test_the_published_tables_join_in_duckdb(demo):
    """What the README's "Querying the tables" shows a downstream team: SQL joins across the
    Iceberg tables, read through pyiceberg into DuckDB."""
    from deepcontent.query import duckdb_connection

    workdir, result = demo
    tracks = result["spectrograms"]["counts"]["computed"]
    with warehouse(workdir) as wh:
        con = duckdb_connection(wh)
        names = {r[0] for r in con.sql("SHOW TABLES").fetchall()}
        assert {"tracks", "plays", "tags", "quarantine", "user_index", "item_index", "splits", "item_factors",
                "embeddings", "similar_tracks"} <= names, names
        # each embedded track's neighbours, named by artist and title through two joins on tracks
        rows = con.sql("""
            SELECT e.track_id, count(*) AS n, count(DISTINCT m.title) AS titles, bool_and(m.track_id IS NOT NULL) AS named
            FROM embeddings e JOIN similar_tracks s ON s.track_id = e.track_id AND s.model_version = e.model_version
            JOIN tracks t ON t.track_id = e.track_id LEFT JOIN tracks m ON m.track_id = s.neighbor_track_id
            GROUP BY e.track_id""").fetchall()
        assert len(rows) == tracks and {r[1] for r in rows} == {5} and all(r[3] for r in rows)
        # the cold-start songs: test-split songs have no WMF factors; every other split song has
        split_factors = dict(con.sql("""
            SELECT s.split, count(f.song_id) FROM splits s LEFT JOIN item_factors f USING (song_id)
            GROUP BY s.split""").fetchall())
        assert split_factors.get("test", 0) == 0 and split_factors["train"] > 0, split_factors
        # every stage's rejects in one table: ingest (dangling tag rows) at least, each with a reason
        by_stage = dict(con.sql("SELECT stage, count(*) FROM quarantine WHERE reason IS NOT NULL GROUP BY stage").fetchall())
        assert by_stage.get("ingest", 0) >= 2, by_stage
        assert con.execute("SELECT count(*) FROM quarantine WHERE reason IS NULL").fetchone()[0] == 0


def test_pipeline_ends_with_the_cold_start_evaluation_and_a_report(demo):
    workdir, result = demo
    cold = result["cold_start"]
    assert tuple(cold) == COLD_START_METHODS
    for method, m in cold.items():
        # a cut-off at or beyond the candidate songs is named for the full list (map_full, ...)
        names = ["auc", *(cutoff_name(kind, k, m["n_candidates"]) for kind, k in (("map", 500), ("ndcg", 10),
                                                                                  ("recall", 50)))]
        assert set(names) <= set(m), (method, names, m)
        assert all(0.0 <= m[k] <= 1.0 for k in names), (method, m)
    # the upper bound sees the test plays; nothing else may come close to it on this catalog
    assert cold["upper_bound"]["auc"] > max(m["auc"] for k, m in cold.items() if k != "upper_bound")
    # transfer ran on the generated target sets: every feature set under both protocols, late fusion, MTAT tag AUC
    transfer = result["evaluate"]["transfer"]
    gtzan = transfer["gtzan"]
    assert gtzan["clips_used"] == gtzan["clips_found"] == 40 and gtzan["grouping"]["groups"] == 20
    features = {"kmeans", *(f"{m}_{part}" for m in ("cnn_mse", "cnn_wpe", "deep_cnn") for part in ("factors", "penultimate"))}
    for name in features | {f"{n}_hpss_fusion" for n in features}:
        r = gtzan[name]
        assert 0.0 <= r["stratified_mean"] <= 1.0 and 0.0 <= r["grouped_accuracy"] <= 1.0, (name, r)
        assert r["grouped"]["folds"] == 2, (name, r["grouped"])
    mtat = {name: transfer["mtat"][name]["top50"] for name in features}
    assert all(np.isnan(r["auc_mean"]) or 0.0 <= r["auc_mean"] <= 1.0 for r in mtat.values()), mtat
    assert all(r["n_tags_evaluated"] > 0 for r in mtat.values()), mtat  # test parts with both classes of some tag
    report = Path(result["evaluate"]["report"])
    html = report.read_text()
    assert report.parent == workdir / ".deepcontent" / "report" and html.count("<figure") >= 3
    assert json.loads((report.parent / "metrics.json").read_text())["cold_start"] == cold
    # the evaluation variants were registered without replacing the production model
    prod = json.loads((workdir / ".deepcontent" / "s3" / "deepcontent" / "models" / "production.json").read_text())
    assert prod["model_version"] == result["train"]["model_version"]
    assert result["evaluate"]["source"]["cnn_wpe"]["model_version"] != prod["model_version"]
    # the raw-audio CNN trained on the published waveforms, one per train / valid / test track
    raw = result["evaluate"]["source"]["raw_cnn"]
    assert raw["model_version"] not in (prod["model_version"], result["evaluate"]["source"]["cnn_mse"]["model_version"])
    assert raw["test_songs_without_audio"] == 0 and np.isfinite(raw["valid_nmse"])
    # the tag source task: every regressor scored, the fold-in upper bound above chance
    tags = result["evaluate"]["tag_prediction"]
    assert tuple(tags["methods"]) == ("random", "bow_linear", "kmeans_linear", "cnn_tags", "upper_bound")
    assert tags["test_songs"] >= 2 and tags["tags"] >= 1
    for m in tags["methods"].values():
        assert 0.0 <= m["auc"] <= 1.0 and 0.0 <= m["map"] <= 1.0
    assert tags["methods"]["upper_bound"]["auc"] > tags["methods"]["random"]["auc"]
    assert "Tag prediction (source task)" in html


def test_nightly_rerun_publishes_nothing_and_new_tracks_are_embedded_exactly_once(demo):
    workdir, _ = demo
    with warehouse(workdir) as wh:
        before = {t: wh.snapshot_count(t) for t in ("embeddings", "similar_tracks", "tracks")}
        rows_before = wh.read("embeddings").num_rows
    summary = last_json(cli(["nightly", "--json", *SETTINGS], workdir))
    assert summary["status"] == "succeeded" and summary["published"] == [], summary
    assert summary["new"] == 0 and summary["changed"] == 0
    with warehouse(workdir) as wh:
        assert {t: wh.snapshot_count(t) for t in before} == before
        assert wh.read("embeddings").num_rows == rows_before

    new_ids = add_tracks(workdir, 5, tag="N")
    summary = last_json(cli(["nightly", "--json", *SETTINGS], workdir))
    assert summary["new"] == 5 and summary["changed"] == 0, summary
    assert summary["stages"]["spectrograms"]["counts"]["computed"] == 5
    assert {"ingest", "spectrograms", "embed", "neighbors"} <= set(summary["published"])
    stored = json.loads((workdir / ".deepcontent" / "s3" / "deepcontent" /
                         summary["summary_uri"].split("s3://deepcontent/", 1)[1]).read_text())
    assert stored["summary"]["new"] == 5 and stored["status"] == "succeeded"
    with warehouse(workdir) as wh:
        emb = wh.read("embeddings")
        assert emb.num_rows == rows_before + 5 and set(new_ids) <= set(emb["track_id"].to_pylist())
        assert wh.snapshot_count("embeddings") == before["embeddings"] + 1  # one commit for the run
        sim = wh.read("similar_tracks")
        assert set(new_ids) <= set(sim["track_id"].to_pylist())


def test_embed_killed_before_its_commit_changes_nothing_and_the_rerun_completes(demo):
    workdir, _ = demo
    new_ids = add_tracks(workdir, 3, tag="K")
    for stage in ("ingest", "spectrograms"):
        last_json(cli([stage, "--json", *SETTINGS], workdir))
    with warehouse(workdir) as wh:
        snaps, rows = wh.snapshot_count("embeddings"), wh.read("embeddings").num_rows
    killed = cli(["embed", "--json", *SETTINGS, "embed.before_commit_hook=embed_faults:kill_before_commit"], workdir)
    assert killed.returncode == -9, killed.stderr[-3000:]
    staging = workdir / ".deepcontent" / "s3" / "deepcontent" / "embeddings" / "staging"
    assert any(staging.rglob("*.parquet"))  # the actors had written their files
    with warehouse(workdir) as wh:
        assert wh.snapshot_count("embeddings") == snaps and wh.read("embeddings").num_rows == rows

    # grace 0: the killed run's staged files count as old (a concurrent run's would be kept)
    result = last_json(cli(["embed", "--json", *SETTINGS, "storage.sweep_grace_s=0"], workdir))
    assert result["published"] and result["counts"]["embedded"] == 3
    with warehouse(workdir) as wh:
        emb = wh.read("embeddings")
        ids = emb["track_id"].to_pylist()
        assert emb.num_rows == rows + 3 and len(ids) == len(set(ids)) and set(new_ids) <= set(ids)
        assert wh.snapshot_count("embeddings") == snaps + 1
    assert not any(staging.rglob("*.parquet"))  # the killed run's files were swept


def _manifest(workdir: Path, uri: str) -> dict:
    return json.loads((workdir / ".deepcontent" / "s3" / "deepcontent" / uri.split("s3://deepcontent/", 1)[1]).read_text())


def test_real_lastfm_quirks_are_counted_not_fatal(demo):
    """Weight-0 tags and dangling lastfm_tags.db rows, as the real dataset has them: the
    pipeline ran through evaluate (the tag task included) and the manifests count them."""
    workdir, result = demo
    ingest = _manifest(workdir, result["ingest"]["manifest"])
    assert ingest["quarantined"]["dangling_id"] == 2 and ingest["counts"]["lastfm_json_superseded_by_db"] > 0
    tags = ingest["counts"]["tags"]
    matrices = _manifest(workdir, result["matrices"]["manifest"])
    assert 0 < matrices["counts"]["tags_below_min_weight"] < tags  # weight-0 tags kept, left out of the matrix
    assert result["evaluate"]["tag_prediction"]["methods"]["upper_bound"]["auc"] > 0.5


def test_embed_audio_equals_the_rows_embed_wrote(demo):
    import deepcontent
    from deepcontent.engines.s3server import EmbeddedS3Server
    from deepcontent.storage import Storage

    workdir, result = demo
    audio = sorted((workdir / ".deepcontent" / "s3" / "deepcontent" / "raw" / "audio").rglob("*.wav"))[:3]
    with EmbeddedS3Server(workdir / ".deepcontent" / "s3") as server:
        storage = Storage("s3://deepcontent", endpoint_url=server.endpoint_url, credentials=server.credentials)
        model = deepcontent.load_model(storage=storage)
        out = deepcontent.embed_audio([str(p) for p in audio], model=model)
    assert model.version == result["train"]["model_version"] and not out.failures
    with warehouse(workdir) as wh:
        emb = {r["track_id"]: r for r in wh.read("embeddings").to_pylist()}
    for i, path in enumerate(audio):
        row = emb[path.stem]
        np.testing.assert_allclose(out.predicted_factors[i], row["predicted_factors"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out.embeddings[i], row["embedding"], rtol=1e-4, atol=1e-5)

    files = cli(["embed-files", "--json", "--out", str(workdir / "files.parquet"), *map(str, audio[:2]), "spark.master=local[2]"],
                workdir)
    got = last_json(files)
    assert got["embedded"] == 2 and (workdir / "files.parquet").exists()


def test_a_settings_change_makes_nightly_fail_instead_of_embedding_nothing(demo, tmp_path):
    import shutil

    workdir, _ = demo
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    out = cli(["nightly", "--json", *SETTINGS, "spectrograms.n_mels=64"], copy)
    assert out.returncode == 1, out.stderr[-3000:]
    msg = next(line for line in out.stderr.splitlines() if "failed:" in line)
    assert "none match" in msg and "Re-run `deepcontent spectrograms`" in msg and msg.count("mel-") == 2
