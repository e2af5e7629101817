"""Sentinel secrets planted everywhere a user puts one (warehouse.properties, a password in
warehouse.uri, spark.conf, the AWS_* and catalog-password environment) must never come out:
not in any file under the work directory (storage root, manifests, catalog), not on the stdout
or stderr of any stage, not from ``submit --dry-run``, not in a config error."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from deepcontent.manifest import log
from deepcontent.redact import RedactingFilter, redact, register_secret
from reliability.harness import CLI, cli, ok

REPO = Path(__file__).resolve().parents[2]
PROP, URL_PW, SPARK, AWS, CATALOG, NUMERIC = ("SENTINEL-prop-7f3a9c", "SENTINEL-url-2b8e", "SENTINEL-spark-5d1c",
                                              "SENTINEL-aws-9e4f", "SENTINEL-catalog-31aa", "98765432123")
SENTINELS = (PROP, URL_PW, SPARK, AWS, CATALOG, NUMERIC)
ENV = {"AWS_SECRET_ACCESS_KEY": AWS, "AWS_ACCESS_KEY_ID": "SENTINELKEYID-aws", "DEEPCONTENT_CATALOG_PASSWORD": CATALOG}


def _secret_overrides(workdir: Path) -> list[str]:
    # (SQLite takes no password in its URL: the URL password rides on the endpoint, which a
    # file:// root never dials; the Postgres case is test_a_failing_stage_does_not_echo_a_secret)
    return ["warehouse.properties.rest.token=" + PROP, f"storage.endpoint_url=http://deepcontent:{URL_PW}@127.0.0.1:9",
            "warehouse.catalog_password_env=DEEPCONTENT_CATALOG_PASSWORD",
            f"spark.conf.spark.hadoop.fs.s3a.secret.key={SPARK}"]


def _hits(text: str) -> list[str]:
    return [s for s in (*SENTINELS, "SENTINELKEYID-aws") if s in text]


def _scan_files(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [s for s in (*SENTINELS, "SENTINELKEYID-aws") if s.encode() in data]
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def test_no_stage_writes_or_prints_a_secret(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    outputs = []
    for stage in ("generate", "ingest", "spectrograms", "matrices", "factorize", "train", "embed", "neighbors"):
        out = cli(wd, stage, "--json", *_secret_overrides(wd), extra_env=ENV)
        outputs.append((stage, out))
        ok(out)
    for stage, out in outputs:
        assert not _hits(out.stdout + out.stderr), f"{stage} printed a secret: {_hits(out.stdout + out.stderr)}"
    assert not _scan_files(wd), f"secrets in files: {_scan_files(wd)}"
    manifests = list((wd / "store" / "runs").rglob("*.json"))
    assert len(manifests) >= 7
    text = manifests[0].read_text()
    assert '"rest.token": "***"' in text and "deepcontent:***@127.0.0.1" in text  # masked, not dropped


def test_a_failing_stage_does_not_echo_a_secret(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    # a catalog password in the URL of a server that is not there: the error names the URL
    out = cli(wd, "ingest", f"warehouse.uri=postgresql+psycopg2://deepcontent:{URL_PW}@127.0.0.1:1/x",
              "--json", extra_env=ENV)
    assert out.returncode != 0
    assert not _hits(out.stdout + out.stderr), out.stderr[-2000:]
    assert not _scan_files(wd)


def test_a_numeric_secret_from_the_environment_is_not_echoed_by_config_validation(tmp_path):
    env = dict(os.environ, DEEPCONTENT__STORAGE__SECRET_ACCESS_KEY=NUMERIC,
               DEEPCONTENT__STORAGE__ACCESS_KEY_ID="[not, a, string]")
    out = subprocess.run(CLI + ["ingest"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "invalid configuration" in out.stderr
    assert NUMERIC not in out.stdout + out.stderr, out.stderr


def test_submit_dry_run_prints_no_secret():
    env = dict(os.environ, **ENV)
    base = CLI + ["submit", "ingest", "--config", str(REPO / "conf" / "cluster.example.yaml"), "--dry-run"]
    plain = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert not _hits(plain.stdout + plain.stderr)
    for override in (f"spark.conf.spark.hadoop.fs.s3a.secret.key={SPARK}", f"warehouse.properties.rest.token={PROP}",
                     f"warehouse.uri=postgresql+psycopg2://u:{URL_PW}@h:5432/db"):
        out = subprocess.run(base + [override], capture_output=True, text=True, env=env, timeout=120)
        assert not _hits(out.stdout + out.stderr), (override, out.stdout, out.stderr)
        if "spark.conf" in override or "properties" in override:
            assert out.returncode != 0 and "refusing" in out.stderr  # never put on a command line


def test_log_lines_are_redacted(caplog):
    register_secret("SENTINEL-log-0c0c")
    record = log.makeRecord("deepcontent", 20, __file__, 1, "connecting with %s to %s",
                            ("SENTINEL-log-0c0c", "postgresql://u:pw-in-url@h/db"), None)
    RedactingFilter().filter(record)
    assert record.getMessage() == "connecting with *** to postgresql://u:***@h/db"
    assert redact({"s3.secret-access-key": "abc", "nested": {"password": 5, "catalog_password_env": "PG"}}) == {
        "s3.secret-access-key": "***", "nested": {"password": "***", "catalog_password_env": "PG"}}
