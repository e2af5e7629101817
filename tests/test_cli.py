"""The command line as a user runs it: help, errors, and the main job on the embedded default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "deepcontent.cli"]


def run(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_explains_commands_and_overrides(tmp_path):
    out = run(["--help"], tmp_path)
    assert out.returncode == 0
    for word in ("generate", "ingest", "pipeline", "key.path=value", "AWS_ACCESS_KEY_ID"):
        assert word in out.stdout
    out = run(["ingest", "--help"], tmp_path)
    assert out.returncode == 0 and "--config" in out.stdout


def test_bad_override_is_a_clear_error_with_the_value(tmp_path):
    out = run(["generate", "synth.songs=many"], tmp_path)
    assert out.returncode == 2 and "songs" in out.stderr and "many" in out.stderr


def test_ingest_without_inputs_names_the_missing_file(tmp_path):
    out = run(["ingest", f"storage.root=file://{tmp_path}/empty", "storage.embedded_s3=false"], tmp_path)
    assert out.returncode == 1 and "unique_tracks.txt" in out.stderr and "Traceback" not in out.stderr


def test_pipeline_on_the_embedded_default_end_to_end(tmp_path):
    """The README's main job, shrunk: real S3 server, Spark, Iceberg in SQLite, all from config."""
    # The stages after factorize have their own end-to-end test (tests/embed/test_embed_pipeline.py).
    args = ["pipeline", "--json", "--stop-after", "factorize", "synth.songs=30", "synth.users=300", "synth.clip_seconds=3",
            "synth.gtzan_per_genre=1", "synth.mtat_clips=4", "spark.master=local[2]"]
    out = run(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["generate"]["songs"] == 30
    ingest = result["ingest"]
    assert ingest["published"] and ingest["counts"]["tracks"] == 30 - result["generate"]["mismatches"]
    assert ingest["counts"]["plays"] > 0
    assert "generate: catalog clips" in out.stderr  # progress on long work
    assert result["spectrograms"]["counts"]["computed"] == ingest["counts"]["tracks"]
    assert result["matrices"]["counts"]["users"] > 0
    assert result["factorize"]["published"] and result["factorize"]["counts"]["train_items"] > 0
    data = tmp_path / ".deepcontent" / "s3" / "deepcontent"
    assert (data / "canonical" / "plays" / "_published.json").exists()
    manifest = json.loads((data / ingest["manifest"].split("s3://deepcontent/", 1)[1]).read_text())
    assert manifest["status"] == "succeeded" and manifest["counts"]["plays"] == ingest["counts"]["plays"]

    # The warehouse tables are real Iceberg tables: read them back through pyiceberg.
    from deepcontent.config import load_config
    from deepcontent.engines.s3server import EmbeddedS3Server
    from deepcontent.storage import Storage
    from deepcontent.warehouse import Warehouse

    cfg = load_config(None, environ={})
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the embedded default's paths are relative to where it ran
    try:
        with EmbeddedS3Server(data.parent) as server:
            storage = Storage("s3://deepcontent", endpoint_url=server.endpoint_url, credentials=server.credentials)
            with Warehouse.from_config(cfg.warehouse, storage) as wh:
                tracks = wh.read("tracks")
                assert tracks.num_rows == ingest["counts"]["tracks"]
                assert pc.all(pc.is_valid(tracks["audio_uri"])).as_py()
                assert wh.read("quarantine").num_rows == sum(ingest["quarantined"].values())
    finally:
        os.chdir(cwd)

    # Re-running with nothing new publishes nothing.
    again = run(["ingest", "--json", "spark.master=local[2]"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["published"] is False, again.stderr[-3000:]


def test_overrides_may_follow_an_option(tmp_path):
    # `evaluate a=1 --seeds 3 b=2` as scripts build it: every key=value counts, wherever it stands
    out = run(["config", "show", "evaluate.seeds_reference=random", "--config", str(REPO / "conf" / "local.yaml"),
               "train.init_lr_scale=0.5"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "seeds_reference: random" in out.stdout and "init_lr_scale: 0.5" in out.stdout
    out = run(["config", "show", "--config", str(REPO / "conf" / "local.yaml"), "stray"], tmp_path)
    assert out.returncode == 2 and "unrecognized arguments: stray" in out.stderr
