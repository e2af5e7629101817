"""``deepcontent submit``: the command lines it builds from a cluster config (fast, dry-run), and
real submissions to a Spark standalone cluster and a Ray head started here on loopback.

The real tests start their clusters as subprocesses in process groups of their own, with their
own ports and temp dirs, and kill exactly those groups afterwards, so Ray sessions or Spark
sessions of other tests are never touched.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from support import config_for
from deepcontent import code_identity, submit
from deepcontent.cli import main as cli_main
from deepcontent.storage import Storage

REPO = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI-not-a-real-secret-K7MDENG"


def _config(tmp_path, data: dict, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"extends": str(REPO / "conf" / "base.yaml"), **data}))
    return path


def _dry_run(capsys, *args) -> list[str]:
    assert submit.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out  # one line, ready to paste into a shell
    return shlex.split(out)


def _confs(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--conf")


# ---- command lines (dry run) ---------------------------------------------------------------------


def test_spark_stage_command_comes_from_the_spark_section(tmp_path, capsys):
    cfg = _config(tmp_path, {"spark": {"master": "spark://spark-head.internal:7077", "driver_memory": "6g",
                                       "executor_memory": "12g", "shuffle_partitions": 64,
                                       "conf": {"spark.executor.cores": "4", "spark.submit.deployMode": "client"}}})
    argv = _dry_run(capsys, "ingest", "--config", str(cfg), "ingest.chunk_bytes=1048576")
    assert argv[0] == str(submit.pyspark_home() / "bin" / "spark-submit") and Path(argv[0]).is_file()
    opts = dict(zip(argv[1:11:2], argv[2:11:2]))
    assert opts == {"--master": "spark://spark-head.internal:7077", "--deploy-mode": "client", "--name": "deepcontent",
                    "--driver-memory": "6g", "--executor-memory": "12g"}
    confs = _confs(argv)
    assert confs["spark.executor.cores"] == "4" and confs["spark.sql.shuffle.partitions"] == "64"
    assert "spark.submit.deployMode" not in confs  # it became --deploy-mode
    # the driver runs here (client mode), the executors on remote hosts with the image's python
    assert confs["spark.pyspark.driver.python"] == sys.executable and "spark.pyspark.python" not in confs
    job = argv.index(str(REPO / "jobs" / "ingest.py"))
    assert argv[job + 1:] == ["--config", str(cfg.resolve()), "ingest.chunk_bytes=1048576"]


def test_spark_on_this_machine_uses_this_interpreter_unless_the_config_names_one(tmp_path, capsys):
    cfg = _config(tmp_path, {"spark": {"master": "spark://127.0.0.1:7077"}})
    assert _confs(_dry_run(capsys, "matrices", "--config", str(cfg)))["spark.pyspark.python"] == sys.executable
    argv = _dry_run(capsys, "matrices", "--config", str(cfg), "spark.conf.spark.pyspark.python=/opt/py/bin/python3")
    assert _confs(argv)["spark.pyspark.python"] == "/opt/py/bin/python3"
    # overrides decide the command too (and travel on to the job)
    argv = _dry_run(capsys, "factorize", "--config", str(cfg), "spark.master=local[2]")
    assert argv[argv.index("--master") + 1] == "local[2]" and argv[-1] == "spark.master=local[2]"


def test_no_wait_needs_cluster_deploy_mode_for_spark(tmp_path, capsys):
    cfg = _config(tmp_path, {"spark": {"master": "k8s://https://kubernetes.default.svc:443"}})
    assert submit.main(["spectrograms", "--config", str(cfg), "--no-wait", "--dry-run"]) == 2
    assert "deployMode=cluster" in capsys.readouterr().err
    argv = _dry_run(capsys, "spectrograms", "--config", str(cfg), "--no-wait", "--jobs-dir", "local:///opt/deepcontent/jobs",
                    "spark.conf.spark.submit.deployMode=cluster")
    assert argv[argv.index("--deploy-mode") + 1] == "cluster"
    confs = _confs(argv)
    assert confs["spark.kubernetes.submission.waitAppCompletion"] == "false"
    assert "spark.pyspark.driver.python" not in confs  # the driver runs in the cluster, not here
    assert "local:///opt/deepcontent/jobs/spectrograms.py" in argv


def test_ray_stage_command_submits_to_the_dashboard_with_the_checkout(tmp_path, capsys):
    cfg = _config(tmp_path, {"ray": {"address": "ray://ray-head.ml.svc:10001"}})
    argv = _dry_run(capsys, "train", "--config", str(cfg), "train.epochs=3", "--no-wait")
    assert argv[:5] == [sys.executable, "-m", "ray.scripts.scripts", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://ray-head.ml.svc:8265"
    assert argv[argv.index("--working-dir") + 1] == str(REPO)
    assert "--no-wait" in argv[:argv.index("--")]
    assert argv[argv.index("--submission-id") + 1].startswith("deepcontent-train-")
    assert json.loads(argv[argv.index("--metadata-json") + 1])["stage"] == "train"
    # the checkout's package travels as py_modules (first on the job's path), its fingerprint in
    # the job's environment for the entry point to check
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert env["py_modules"] == [str(REPO / "src" / "deepcontent")]
    assert env["env_vars"] == {code_identity.ENV: code_identity.fingerprint(REPO / "src" / "deepcontent")}
    assert "__pycache__/" in env["excludes"]
    assert json.loads(argv[argv.index("--metadata-json") + 1])["code"] == env["env_vars"][code_identity.ENV]
    entry = argv[argv.index("--") + 1:]
    assert entry == ["python", "jobs/train.py", "--config", str(cfg.resolve()), "train.epochs=3", "ray.address=auto"]
    # --address wins over the config; a config inside the checkout travels as a relative path
    argv = _dry_run(capsys, "train", "--config", str(REPO / "conf" / "cluster.example.yaml"), "--address", "http://10.1.2.3:8265")
    assert argv[argv.index("--address") + 1] == "http://10.1.2.3:8265"
    assert argv[argv.index("--") + 1:][:4] == ["python", "jobs/train.py", "--config", "conf/cluster.example.yaml"]


def test_ray_stage_without_an_address_is_a_clear_error(tmp_path, capsys):
    cfg = _config(tmp_path, {})
    assert submit.main(["train", "--config", str(cfg), "--dry-run"]) == 2
    assert "ray.address" in capsys.readouterr().err


def test_secrets_never_reach_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("DEEPCONTENT_CATALOG_PASSWORD", "catalog-pass-123456")
    cfg = _config(tmp_path, {"storage": {"root": "s3://music/dc", "credentials_file": "/etc/deepcontent/aws-credentials"},
                             "warehouse": {"catalog_password_env": "DEEPCONTENT_CATALOG_PASSWORD"},
                             "spark": {"master": "spark://10.0.0.5:7077"}, "ray": {"address": "http://10.0.0.6:8265"}})
    for stage in ("ingest", "train"):
        line = shlex.join(_dry_run(capsys, stage, "--config", str(cfg)))
        for value in (SECRET, "AKIAEXAMPLEKEYID0001", "catalog-pass-123456"):
            assert value not in line
    # a secret handed over as an override or a Spark conf is refused, and not echoed back
    assert submit.main(["ingest", "--config", str(cfg), "--dry-run", f"storage.secret_access_key={SECRET}"]) == 2
    err = capsys.readouterr().err
    assert "storage.secret_access_key" in err and SECRET not in err
    assert submit.main(["ingest", "--config", str(cfg), "--dry-run", f"spark.conf.spark.hadoop.fs.s3a.secret.key={SECRET}"]) == 2
    err = capsys.readouterr().err
    assert "spark.hadoop.fs.s3a.secret.key" in err and SECRET not in err
    # ... but a reference to a Kubernetes Secret is configuration, not a secret
    argv = _dry_run(capsys, "ingest", "--config", str(cfg),
                    "spark.conf.spark.kubernetes.driver.secretKeyRef.AWS_SECRET_ACCESS_KEY=deepcontent-s3:secret_access_key")
    assert _confs(argv)["spark.kubernetes.driver.secretKeyRef.AWS_SECRET_ACCESS_KEY"] == "deepcontent-s3:secret_access_key"


def test_bad_requests_exit_2_naming_the_bad_value(tmp_path, capsys):
    cfg = _config(tmp_path, {})
    assert submit.main(["trian", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "'trian'" in err and all(s in err for s in submit.STAGES)
    assert submit.main(["ingest", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err
    (tmp_path / "checkout" / "jobs").mkdir(parents=True)
    assert submit.main(["ingest", "--config", str(cfg), "--project-dir", str(tmp_path / "checkout"), "--dry-run"]) == 2
    assert str(tmp_path / "checkout" / "jobs" / "ingest.py") in capsys.readouterr().err
    assert submit.main(["ingest", "--config", str(cfg), "--dry-run", "spark.shuffle_partitions=many"]) == 2
    assert "many" in capsys.readouterr().err


def test_the_submitters_failure_is_the_exit_status(tmp_path, capsys, monkeypatch):
    """A submitter that fails: its status comes back with one line saying so."""
    fake = tmp_path / "spark" / "bin" / "spark-submit"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'submitting' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(submit, "pyspark_home", lambda: tmp_path / "spark")
    cfg = _config(tmp_path, {"spark": {"master": "spark://10.0.0.5:7077"}})
    assert submit.main(["ingest", "--config", str(cfg), "-q"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "deepcontent submit: ingest failed: spark-submit exited with status 3 (its output is above)"


def test_the_cli_dispatches_submit(tmp_path, capsys):
    assert cli_main(["submit", "nope", "--config", str(_config(tmp_path, {}))]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "deepcontent.cli", "submit", "ingest", "--config",
                          str(REPO / "conf" / "cluster.example.yaml"), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout)[-2:] == ["--config", str(REPO / "conf" / "cluster.example.yaml")]


def test_a_job_refuses_to_run_other_code_than_was_submitted(tmp_path, capsys):
    """The entry point's check: the fingerprint in the job's environment must be the imported
    package's, or the job stops before it reads its config (exit 2, both codes named)."""
    here = code_identity.fingerprint()
    assert here == code_identity.fingerprint(code_identity.package_dir()) and len(here) == 16
    assert code_identity.check_submitted_code({}) is None  # not a submitted job
    assert here in code_identity.check_submitted_code({code_identity.ENV: here})
    with pytest.raises(submit.SubmitError, match=f"code {here}.*code 0123456789abcdef"):
        code_identity.check_submitted_code({code_identity.ENV: "0123456789abcdef"})
    # the fingerprint follows the sources: one changed byte changes it
    copy = tmp_path / "deepcontent"
    shutil.copytree(code_identity.package_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_identity.fingerprint(copy) == here
    (copy / "__init__.py").write_text((copy / "__init__.py").read_text() + "\n")
    assert code_identity.fingerprint(copy) != here
    out = subprocess.run([sys.executable, "-m", "deepcontent.cli", "maintain", "--config", str(_config(tmp_path, {}))],
                         env=dict(os.environ, **{code_identity.ENV: "0123456789abcdef"}), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "not the code that was submitted (code 0123456789abcdef)" in out.stderr, out.stderr


def test_a_ray_jobs_config_carries_no_secret(tmp_path):
    from deepcontent.config import load_config

    cfg = load_config(_config(tmp_path, {"storage": {"root": "s3://music/dc", "embedded_s3": False}}),
                      environ={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0001", "AWS_SECRET_ACCESS_KEY": SECRET})
    data = submit.job_config(cfg)
    assert data["storage"]["access_key_id"] is None and data["storage"]["secret_access_key"] is None
    assert SECRET not in json.dumps(data) and "AKIAEXAMPLEKEYID0001" not in json.dumps(data)
    assert load_config(_write(tmp_path / "job.yaml", data), environ={}).public_dict() == \
        load_config(_write(tmp_path / "job2.yaml", data), environ={}).public_dict()
    # a secret the cluster could not get from its environment is refused, not written down
    cfg = load_config(_config(tmp_path, {"warehouse": {"uri": "postgresql://dc:hunter2-secret@db:5432/iceberg"}}),
                      environ={})
    with pytest.raises(submit.SubmitError, match="warehouse.uri"):
        submit.job_config(cfg)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---- real clusters on loopback ---------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all sockets held open until every port is chosen, so
    the OS cannot hand the same port out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_group(proc: subprocess.Popen, marker: str | None = None) -> None:
    """SIGTERM the process group we started, SIGKILL what is left, then any process whose command
    line names ``marker`` (our own temp dir: a daemon that left the group)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if marker:
        time.sleep(0.5)
        for pid in _pids_naming(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pids_naming(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _wait_for(predicate, *, what: str, timeout: float, procs=(), logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a process exited with {p.returncode}\n" + "\n".join(
                    Path(f).read_text()[-3000:] for f in logs))
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what}: not ready after {timeout}s\n" + "\n".join(Path(f).read_text()[-3000:] for f in logs))


def _json(url: str):
    """The JSON at ``url``, or {} while the server is still coming up (connection refused, or an
    HTML page served before the JSON endpoint is ready)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return json.load(r)
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def spark_standalone(tmp_path_factory):
    """A Spark standalone master and one worker (2 cores) on loopback, run from the pyspark
    package; yields ``(master_url, master_ui_url)``."""
    home = submit.pyspark_home()
    d = tmp_path_factory.mktemp("spark-standalone")
    env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1", SPARK_DAEMON_MEMORY="512m",
               SPARK_LOG_DIR=str(d), SPARK_WORKER_DIR=str(d / "work"), SPARK_LOCAL_DIRS=str(d / "local"))
    port, ui, wport, wui = _free_ports(4)
    spark_class = str(home / "bin" / "spark-class")
    master = subprocess.Popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)],
                              env=env, stdout=open(d / "master.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    worker = subprocess.Popen([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                               "--port", str(wport), "--webui-port", str(wui), "--cores", "2", "--memory", "2g",
                               "--work-dir", str(d / "work"), f"spark://127.0.0.1:{port}"],
                              env=env, stdout=open(d / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    ui_url = f"http://127.0.0.1:{ui}"
    try:
        _wait_for(lambda: _json(f"{ui_url}/json/").get("aliveworkers", 0) >= 1, what="Spark standalone cluster",
                  timeout=120, procs=(master, worker), logs=(d / "master.log", d / "worker.log"))
        yield f"spark://127.0.0.1:{port}", ui_url
    finally:
        _stop_group(worker)
        _stop_group(master)


def _submit(args, *, cwd, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "deepcontent.cli", "submit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _cluster_config(tmp_path, storage: Storage, **sections) -> Path:
    """A cluster config as an operator writes it: a file:// root every process on this machine
    reaches (no S3 server in between), and an Iceberg catalog in SQLite."""
    return _config(tmp_path, {"storage": {"root": storage.root, "embedded_s3": False},
                              "warehouse": {"uri": f"sqlite:///{tmp_path}/catalog.db"}, **sections})


def test_ingest_submitted_to_a_spark_standalone_cluster(spark_standalone, tmp_path):
    from deepcontent.synth.generate import generate

    master, ui = spark_standalone
    storage = Storage(f"file://{tmp_path}/store")
    storage.ensure_root()
    songs = {"synth.songs": 30, "synth.users": 300, "synth.audio": "false", "synth.gtzan_per_genre": 0, "synth.mtat_clips": 0}
    generated = generate(config_for(storage, tmp_path, **songs), storage)
    cfg = _cluster_config(tmp_path, storage, spark={"master": master, "driver_memory": "1g", "executor_memory": "1g",
                                                    "shuffle_partitions": 2, "conf": {"spark.ui.enabled": "false"}})
    apps_before = len(_json(f"{ui}/json/")["completedapps"])
    # The secret is in the submitter's environment (where credentials belong) and nowhere else.
    out = _submit(["ingest", "--config", str(cfg)], cwd=tmp_path,
                  env_extra={"SPARK_LOCAL_IP": "127.0.0.1", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert out.returncode == 0, out.stderr[-5000:]
    assert SECRET not in out.stdout + out.stderr
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["published"] and result["counts"]["tracks"] == 30 - generated["mismatches"]
    assert storage.read_json(storage.uri("canonical", "tracks", "_published.json"))
    assert storage.read_json(result["manifest"])["status"] == "succeeded"
    assert storage.read_dataset(storage.uri("canonical", "plays")).num_rows == result["counts"]["plays"] > 0
    # it ran as an application of the standalone master, on the worker's executors
    # (the master records the application's end a moment after the driver has gone)
    _wait_for(lambda: len(_json(f"{ui}/json/")["completedapps"]) > apps_before, what="completed application", timeout=30)
    apps = _json(f"{ui}/json/")["completedapps"]
    assert len(apps) == apps_before + 1 and apps[-1]["state"] == "FINISHED", apps


def test_a_stage_failing_on_the_cluster_is_the_exit_status(spark_standalone, tmp_path):
    master, _ = spark_standalone
    cfg = _cluster_config(tmp_path, Storage(f"file://{tmp_path}/empty-store"),
                          spark={"master": master, "driver_memory": "1g", "executor_memory": "1g",
                                 "conf": {"spark.ui.enabled": "false"}})
    out = _submit(["ingest", "--config", str(cfg)], cwd=tmp_path, env_extra={"SPARK_LOCAL_IP": "127.0.0.1"})
    assert out.returncode == 1, out.stderr[-3000:]
    # the job's own one-line error (spark-submit runs the Python driver with its stderr on stdout)
    assert "deepcontent ingest: failed: InputMissingError" in out.stdout and "unique_tracks.txt" in out.stdout, out.stdout[-3000:]
    assert out.stderr.strip().splitlines()[-1] == \
        "deepcontent submit: ingest failed: spark-submit exited with status 1 (its output is above)"


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head (1 node, 2 CPUs, dashboard with the job API) started by ``ray start --block``
    in its own process group and temp dir; yields the dashboard URL."""
    if submit.ray_jobs_client_missing():
        pytest.skip(f"the Ray job API needs ray[default] (missing: {', '.join(submit.ray_jobs_client_missing())})")
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    port, dash, agent = _free_ports(3)
    env = dict(os.environ, **RAY_ENV, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    log_file = Path(temp) / "head.log"
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
                             "--num-cpus", "2", "--include-dashboard=true", "--temp-dir", temp, "--disable-usage-stats"],
                            env=env, stdout=open(log_file, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for(lambda: _json(f"{url}/api/version"), what="Ray head", timeout=120, procs=(head,), logs=(log_file,))
        yield url
    finally:
        _stop_group(head, marker=temp)
        shutil.rmtree(temp, ignore_errors=True)


# Token auth off for this private loopback head (and so for its submitter); a cluster's token
# reaches `ray job submit` through RAY_AUTH_TOKEN or ~/.ray/auth_token, never the command line.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "OMP_NUM_THREADS": "1"}

# A catalog small enough to train on in seconds: 40 songs of 4 s, 8 WMF factors.
TINY = {"synth.songs": 40, "synth.users": 400, "synth.clip_seconds": 4, "synth.audio_format": "wav",
        "synth.gtzan_per_genre": 0, "synth.mtat_clips": 0, "synth.lastfm_format": "none", "synth.mismatch_fraction": 0.0,
        "matrices.split_fractions": "[0.6,0.3,0.1]", "factorize.factors": 8, "factorize.num_threads": 1}


@pytest.mark.slow
def test_train_submitted_to_a_ray_head(ray_head, spark, tmp_path):
    """`train` as a Ray job: the checkout is uploaded, the job joins the cluster (`auto`), trains
    on one worker and registers the model in the file:// store."""
    from support import run_stage
    from deepcontent.synth.generate import generate

    storage = Storage(f"file://{tmp_path}/store")
    storage.ensure_root()
    cfg = config_for(storage, tmp_path, **TINY)
    generate(cfg, storage)
    run_stage("ingest", cfg, storage, spark)
    run_stage("spectrograms", cfg, storage, spark)
    run_stage("matrices", cfg, storage, spark)
    run_stage("factorize", cfg, storage)

    config = _cluster_config(tmp_path, storage, ray={"address": ray_head},
                             matrices={"split_fractions": [0.6, 0.3, 0.1]}, factorize={"factors": 8},
                             train={"epochs": 2, "num_workers": 1, "batch_size": 16, "windows_per_clip": 1, "patience": 2})
    out = _submit(["train", "--config", str(config)], cwd=tmp_path,
                  env_extra={**RAY_ENV, "AWS_SECRET_ACCESS_KEY": SECRET})
    assert out.returncode == 0, (out.stdout[-4000:], out.stderr[-4000:])
    assert SECRET not in out.stdout + out.stderr
    assert "succeeded" in out.stderr + out.stdout
    production = storage.read_json(storage.uri("models", "production.json"))
    manifests = [o.uri for o in storage.list(storage.uri("runs", "train")) if o.uri.endswith(".json")]
    assert len(manifests) == 1 and storage.read_json(manifests[0])["status"] == "succeeded"
    assert production["model_version"].startswith("paper_cnn-")
    jobs = [j for j in _json(f"{ray_head}/api/jobs/") if j["metadata"].get("stage") == "train"]
    assert [j["status"] for j in jobs] == ["SUCCEEDED"]


def _checkout_with_marker(tmp_path: Path) -> tuple[Path, str]:
    """A copy of this checkout (src/, jobs/, conf/) whose package differs from the installed one:
    a marker constant, printed when the package is imported."""
    checkout = tmp_path / "checkout"
    for part in ("src", "jobs", "conf"):
        shutil.copytree(REPO / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    marker = f"working-copy-{os.urandom(6).hex()}"
    init = checkout / "src" / "deepcontent" / "__init__.py"
    init.write_text(init.read_text() + f"\nCODE_MARKER = {marker!r}\n"
                    "import sys as _sys\nprint('deepcontent CODE_MARKER=' + CODE_MARKER, file=_sys.stderr, flush=True)\n")
    return checkout, marker


def test_a_submitted_ray_job_runs_the_uploaded_code_not_the_installed(ray_head, tmp_path):
    """`deepcontent submit` of a Ray stage from a working copy whose package differs from the
    one installed here (and so on this Ray head): the job imports the uploaded package (its
    marker is printed, its fingerprint checked) and the stage runs to the end."""
    import deepcontent

    checkout, marker = _checkout_with_marker(tmp_path)
    assert not hasattr(deepcontent, "CODE_MARKER")  # the installed package has no marker
    uploaded = code_identity.fingerprint(checkout / "src" / "deepcontent")
    assert uploaded != code_identity.fingerprint()
    storage = Storage(f"file://{tmp_path}/store")
    storage.ensure_root()
    config = _cluster_config(tmp_path, storage, ray={"address": ray_head})
    out = _submit(["maintain", "--config", str(config), "--project-dir", str(checkout)], cwd=tmp_path,
                  env_extra=RAY_ENV)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-5000:]
    assert f"deepcontent CODE_MARKER={marker}" in logs
    assert f"running the submitted deepcontent code {uploaded}" in logs
    assert f"from {REPO / 'src' / 'deepcontent'}" not in logs  # not the installed package
    jobs = [j for j in _json(f"{ray_head}/api/jobs/") if j["metadata"].get("code") == uploaded]
    assert [(j["status"], j["metadata"]["stage"]) for j in jobs] == [("SUCCEEDED", "maintain")]


def test_without_the_uploaded_package_the_job_refuses_to_run(ray_head, tmp_path):
    """What `submit` used to do: upload the checkout as working_dir only. With the src/ layout
    the job imports the installed package, not the submitted one; the fingerprint check stops it."""
    checkout, marker = _checkout_with_marker(tmp_path)
    config = _cluster_config(tmp_path, Storage(f"file://{tmp_path}/store"))
    env = {"working_dir": str(checkout), "excludes": submit.RAY_EXCLUDES,
           "env_vars": {code_identity.ENV: code_identity.fingerprint(checkout / "src" / "deepcontent")}}
    out = subprocess.run([*submit.ray_cli(), "job", "submit", "--address", ray_head, "--runtime-env-json", json.dumps(env),
                          "--", "python", "jobs/maintain.py", "--config", str(config), "ray.address=auto"],
                         cwd=tmp_path, env=dict(os.environ, **RAY_ENV), capture_output=True, text=True, timeout=300)
    logs = out.stdout + out.stderr
    assert out.returncode != 0, logs[-3000:]
    assert f"deepcontent CODE_MARKER={marker}" not in logs
    assert "not the code that was submitted" in logs, logs[-3000:]


def test_the_nightly_runs_its_ray_stages_as_ray_jobs(ray_head, tmp_path):
    """`deepcontent nightly` with a cluster's address: its Ray stages go through the Jobs API
    (shipping this package and the run's config), never Ray Client; the summary names each job."""
    storage = Storage(f"file://{tmp_path}/store")
    storage.ensure_root()
    config = _cluster_config(tmp_path, storage, ray={"address": ray_head})
    out = subprocess.run([sys.executable, "-m", "deepcontent.cli", "nightly", "--config", str(config), "--json",
                          "nightly.stages=[maintain]", "embed.model_version=none-needed"],
                         cwd=tmp_path, env=dict(os.environ, **RAY_ENV), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    job_id = summary["stages"]["maintain"]["ray_job_id"]
    assert summary["status"] == "succeeded" and summary["stages"]["maintain"]["run_id"].startswith("maintain-")
    (job,) = [j for j in _json(f"{ray_head}/api/jobs/") if j["submission_id"] == job_id]
    assert job["status"] == "SUCCEEDED" and job["metadata"]["code"] == code_identity.fingerprint()
    assert job["entrypoint"].startswith("python -m deepcontent.cli maintain --config config.yaml")
