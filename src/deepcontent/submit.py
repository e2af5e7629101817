"""``deepcontent submit``: hand one stage to a cluster, the way an operator or a scheduler would.

    deepcontent submit ingest --config /etc/deepcontent/cluster.yaml
    deepcontent submit train --config conf/cluster.yaml train.epochs=50 --dry-run

The stage runs on the cluster through its thin entry point ``jobs/<stage>.py``, not in this
process; this module only builds the submitter's command line from the cluster config and runs it:

* **Spark stages** (ingest, spectrograms, matrices, factorize, waveforms, nightly: those the stage
  registry marks ``engine="spark"``) go through ``spark-submit``
  (the script shipped in the installed pyspark package, so no separate Spark install is needed to
  submit). Master, deploy mode (``spark.conf`` key ``spark.submit.deployMode``), driver/executor
  memory, shuffle partitions and every other ``spark.conf`` entry come from the ``spark`` section
  of the config.
* **Ray stages** (train, embed, neighbors, evaluate, transfer, maintain) go through ``ray job
  submit`` to the Ray dashboard (``http://head:8265``; the Ray Jobs API, never Ray Client),
  uploading the checkout as the job's working directory and the deepcontent package it holds as
  the job's ``py_modules``: the uploaded code comes first on the job's ``PYTHONPATH``, so the job
  runs the code that was submitted, not the copy installed in the cluster's image. The job checks
  that before it starts (its entry point compares the package it imported with the fingerprint
  the submission names, :mod:`deepcontent.code_identity`). Inside the job ``ray.address=auto``
  joins the cluster the job runs on. :func:`run_ray_stage_job` does the same from Python (the
  nightly job's Ray stages on a cluster).

The job re-reads the same config file with the same ``key.path=value`` overrides, so what the
submitter decides (the Spark master, the Ray address) and what the stage does agree. The cluster
side needs deepcontent installed (the image built from ``infra/Dockerfile``) and the config file at
the same path (``/etc/deepcontent/cluster.yaml`` from a ConfigMap in ``infra/k8s``) unless it lies
inside the uploaded checkout.

**No secret is ever put on the command line** (where ``ps``, scheduler logs and ``--dry-run``
would show it): S3 keys reach the driver through its environment or ``storage.credentials_file``,
and the stages ship them to their tasks themselves. Overrides of the secret fields are refused,
and a command that would contain a known secret value (from the config or the ``AWS_*`` /
catalog-password environment) is refused before anything runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deepcontent.code_identity import ENV as CODE_ENV
from deepcontent.code_identity import fingerprint, package_dir
from deepcontent.config import Config, ConfigError, load_config
from deepcontent.errors import StageError, SubmitError
from deepcontent.manifest import log, setup_logging
from deepcontent.redact import RedactingArgumentParser, looks_secret, redact_text
from deepcontent.stages import STAGES as REGISTRY

# How each registered stage reaches a cluster (deepcontent.stages.Stage.engine).
SPARK_STAGES = tuple(name for name, s in REGISTRY.items() if s.engine == "spark")
RAY_STAGES = tuple(name for name, s in REGISTRY.items() if s.engine == "ray")
STAGES = tuple(REGISTRY)

# The port ``ray job submit`` talks to (the dashboard's job API), not the Ray Client port.
RAY_DASHBOARD_PORT = 8265
# Overrides that would put a secret on the command line; they belong in the environment or in
# storage.credentials_file.
SECRET_OVERRIDES = ("storage.access_key_id", "storage.secret_access_key")
# Environment variables whose values must never appear in a submitted command.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Paths never uploaded with a Ray job's working directory (Ray already skips .git, .venv and
# whatever .gitignore lists; these matter for a checkout without a .gitignore).
RAY_EXCLUDES = [".deepcontent/", "spark-warehouse/", "metastore_db/", "*.egg-info/", "__pycache__/",
                ".venv-airflow*"]
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass
class Submission:
    """The submitter's command, the environment it runs in (this process's plus ``env``) and
    the directory it runs from."""

    stage: str
    engine: str
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as one shell-quoted line (what ``--dry-run`` prints)."""
        return shlex.join(self.argv)


def default_project_dir() -> Path:
    """The checkout holding ``jobs/``: the one this package runs from (an editable install or
    ``src/`` on the path), else the current directory (a non-editable install run from a
    checkout)."""
    repo = Path(__file__).resolve().parents[2]
    return repo if (repo / "jobs").is_dir() else Path.cwd()


def pyspark_home() -> Path:
    """The installed pyspark package: it carries ``bin/spark-submit`` and Spark's jars, so it is
    a complete SPARK_HOME for submitting."""
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _is_uri(path: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) is not None


def _job_file(stage: str, jobs_dir: str) -> str:
    """``<jobs_dir>/<stage>.py``; a local one must exist now (a URI such as
    ``local:///opt/deepcontent/jobs`` names the image's copy and is checked by the cluster)."""
    if _is_uri(jobs_dir):
        return f"{jobs_dir.rstrip('/')}/{stage}.py"
    path = Path(jobs_dir).resolve() / f"{stage}.py"
    if not path.is_file():
        raise SubmitError(f"job file not found: {path} (stage {stage!r} has no entry point in this checkout)")
    return str(path)


def _spark_hosts(master: str) -> list[str] | None:
    """Hosts of a ``spark://h1:p,h2:p`` master, None for other masters."""
    if not master.startswith("spark://"):
        return None
    return [hp.rsplit(":", 1)[0] for hp in master[len("spark://"):].split(",") if hp]


def _master_on_this_machine(master: str) -> bool:
    """Whether executors run on this machine (and so can use this interpreter)."""
    if master.startswith("local"):
        return True
    hosts = _spark_hosts(master)
    if not hosts:
        return False
    here = _LOCAL_HOSTS | {socket.gethostname(), socket.getfqdn()}
    return all(h in here for h in hosts)


def spark_command(stage: str, *, cfg: Config, config_arg: str, overrides: list[str], jobs_dir: str,
                  no_wait: bool, project: Path) -> Submission:
    """``spark-submit`` for a Spark stage, from ``cfg.spark``."""
    sc = cfg.spark
    conf = dict(sc.conf)
    secret_keys = sorted(k for k in conf if looks_secret(k))
    if secret_keys:
        raise SubmitError(f"refusing to submit: spark.conf {', '.join(secret_keys)} would put a secret on the "
                          f"spark-submit command line; set it in the cluster's spark-defaults.conf or the "
                          f"driver's environment instead")
    deploy_mode = conf.pop("spark.submit.deployMode", "client")
    if deploy_mode not in ("client", "cluster"):
        raise SubmitError(f"spark.conf spark.submit.deployMode must be client or cluster, got {deploy_mode!r}")
    if deploy_mode == "cluster" and sc.master.startswith("local"):
        raise SubmitError(f"spark.submit.deployMode=cluster needs a cluster master, got spark.master={sc.master!r}")
    if no_wait:
        if deploy_mode != "cluster":
            raise SubmitError("--no-wait needs spark.submit.deployMode=cluster: in client mode the driver "
                              "runs inside spark-submit, so it cannot return before the stage ends")
        # Each cluster manager has its own switch; standalone does not wait by default.
        for prefix, key in (("k8s://", "spark.kubernetes.submission.waitAppCompletion"),
                            ("yarn", "spark.yarn.submit.waitAppCompletion"),
                            ("spark://", "spark.standalone.submit.waitAppCompletion")):
            if sc.master.startswith(prefix):
                conf.setdefault(key, "false")
    conf.setdefault("spark.sql.shuffle.partitions", str(sc.shuffle_partitions))
    # Driver and executors must run an interpreter with deepcontent installed. In client mode the
    # driver is this machine, so this interpreter; executors use it only when they run here too
    # (on a cluster the image's python3 applies unless spark.conf names another).
    if deploy_mode == "client":
        conf.setdefault("spark.pyspark.driver.python", sys.executable)
    if _master_on_this_machine(sc.master):
        conf.setdefault("spark.pyspark.python", sys.executable)
    home = pyspark_home()
    argv = [str(home / "bin" / "spark-submit"), "--master", sc.master, "--deploy-mode", deploy_mode,
            "--name", sc.app_name, "--driver-memory", sc.driver_memory,
            "--executor-memory", sc.executor_memory]
    for key in sorted(conf):
        argv += ["--conf", f"{key}={conf[key]}"]
    argv += [_job_file(stage, jobs_dir), "--config", config_arg, *overrides]
    return Submission(stage, "spark", argv, cwd=str(project), env={"SPARK_HOME": str(home)})


def ray_dashboard_address(address: str) -> str:
    """The job-submission address for ``address``: ``http(s)://`` as given, a Ray Client
    ``ray://host:port`` mapped to the dashboard on the same host (port 8265), ``host:port`` as
    ``http://host:port``."""
    if address in ("auto", "local", ""):
        raise SubmitError(f"ray address {address!r} cannot take a job submission; pass --address "
                          f"http://<head>:{RAY_DASHBOARD_PORT} or set ray.address")
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    if address.startswith("ray://"):
        host = address[len("ray://"):].split("/", 1)[0].rsplit(":", 1)[0]
        return f"http://{host}:{RAY_DASHBOARD_PORT}"
    if _is_uri(address):
        raise SubmitError(f"ray address {address!r}: expected http://host:{RAY_DASHBOARD_PORT} or ray://host:port")
    return f"http://{address}"


def ray_cli() -> list[str]:
    """The ``ray`` command of this interpreter (the console script's module, so the Ray that
    submits is the Ray the package was installed with)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def ray_jobs_client_missing() -> list[str]:
    """Modules the Ray jobs CLI needs that are not installed (they come with ``ray[default]``,
    which the minimal ``ray[train,data]`` install lacks); empty when it can submit."""
    import importlib.util

    return [m for m in ("aiohttp", "requests") if importlib.util.find_spec(m) is None]


def shipped_package(project: Path) -> Path:
    """The deepcontent package a Ray job ships as its ``py_modules``: the checkout's
    ``src/deepcontent`` when ``project`` is a source checkout, else the package this process
    imported (an installed deepcontent submitting from elsewhere)."""
    candidate = project / "src" / "deepcontent"
    if (candidate / "__init__.py").is_file():
        return candidate.resolve()
    import deepcontent

    return Path(deepcontent.__file__).resolve().parent


def ray_runtime_env(package: Path, working_dir: Path | None = None) -> dict:
    """The runtime environment of a deepcontent Ray job: ``package`` uploaded as ``py_modules``
    (first on the job's ``PYTHONPATH``), the fingerprint of that code in the job's environment
    (checked by the job's entry point), and ``working_dir`` when given."""
    env: dict = {"py_modules": [str(package)], "excludes": RAY_EXCLUDES,
                 "env_vars": {CODE_ENV: fingerprint(package)}}
    if working_dir is not None:
        env["working_dir"] = str(working_dir)
    return env


def ray_command(stage: str, *, cfg: Config, config_arg: str, overrides: list[str], jobs_dir: str,
                no_wait: bool, project: Path, address: str | None, python: str) -> Submission:
    """``ray job submit`` for a Ray stage, uploading ``project`` as the working directory and its
    deepcontent package as ``py_modules``."""
    target = address or cfg.ray.address
    if not target:
        raise SubmitError(f"no Ray address: set ray.address in the config or pass --address "
                          f"http://<head>:{RAY_DASHBOARD_PORT}")
    dashboard = ray_dashboard_address(target)
    if _is_uri(jobs_dir):
        raise SubmitError(f"--jobs-dir {jobs_dir!r}: a Ray job runs jobs/<stage>.py from the uploaded checkout, "
                          f"not from a URI")
    job = Path(_job_file(stage, jobs_dir))
    try:  # the entry point runs from the uploaded copy of the checkout
        job_arg = str(job.relative_to(project.resolve()))
    except ValueError:
        raise SubmitError(f"job file {job} is outside the working directory {project} that Ray uploads; "
                          f"pass --project-dir") from None
    submission_id = f"deepcontent-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    runtime_env = ray_runtime_env(shipped_package(project.resolve()))
    argv = [*ray_cli(), "job", "submit", "--address", dashboard, "--submission-id", submission_id,
            "--working-dir", str(project.resolve()),
            "--runtime-env-json", json.dumps(runtime_env, separators=(",", ":")),
            "--metadata-json", json.dumps({"stage": stage, "run_name": cfg.run_name,
                                           "code": runtime_env["env_vars"][CODE_ENV]}, separators=(",", ":"))]
    if no_wait:
        argv.append("--no-wait")
    # Inside the job, `auto` joins the cluster it runs on (the config's address is for submitters).
    argv += ["--", python, job_arg, "--config", config_arg, *overrides, "ray.address=auto"]
    return Submission(stage, "ray", argv, cwd=str(project))


def job_config(cfg: Config) -> dict:
    """``cfg`` as a config file a Ray job on the cluster can load: every value, with the S3 keys
    left out (the cluster's own environment or credentials file provides them). A secret the
    cluster could not get otherwise (in ``warehouse.properties``, ``spark.conf`` or a URL) is
    refused rather than written down."""
    data = cfg.public_dict()
    data["storage"]["access_key_id"] = data["storage"]["secret_access_key"] = None
    hidden = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        elif isinstance(node, str) and "***" in node:
            hidden.append(path)

    walk(data, "")
    if hidden:
        raise SubmitError(f"cannot hand {', '.join(hidden)} to a Ray job: the value holds a secret; give it to the "
                          f"cluster through its environment (warehouse.catalog_password_env, AWS_*) instead")
    return data


def run_ray_stage_job(stage: str, cfg: Config, *, address: str, timeout_s: float | None = None,
                      poll_s: float = 2.0, log=None) -> dict:
    """Run ``stage`` as a Ray job through the Jobs API of the cluster at ``address`` and wait for it.

    The job ships this process's deepcontent package (``py_modules``, code identity checked by
    the job) and ``cfg`` as its config file (:func:`job_config`); it runs
    ``python -m deepcontent.cli <stage> --json ray.address=auto``.

    Returns
    -------
    dict
        The stage's result as the job printed it (``run_id``, ``published``, ``counts``,
        ``quarantined``, ...), plus ``ray_job_id``.

    Raises
    ------
    StageError
        The job failed or stopped (the message names the job and ends with its log's tail).
    """
    import tempfile

    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    if stage not in RAY_STAGES:
        raise SubmitError(f"{stage!r} is not a Ray stage ({', '.join(RAY_STAGES)})")
    if cfg.storage.embedded_s3:
        raise SubmitError("a Ray job on a cluster cannot reach the embedded S3 server of this process; "
                          "set storage.embedded_s3=false and a store the cluster shares")
    dashboard = ray_dashboard_address(address)
    package = package_dir()  # the code this process runs
    with tempfile.TemporaryDirectory(prefix="deepcontent-job-") as work:
        Path(work, "config.yaml").write_text(yaml.safe_dump(job_config(cfg), sort_keys=False))
        client = JobSubmissionClient(dashboard)
        submission_id = f"deepcontent-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        runtime_env = ray_runtime_env(package, Path(work))
        client.submit_job(
            entrypoint=shlex.join(["python", "-m", "deepcontent.cli", stage, "--config", "config.yaml", "--json",
                                   "ray.address=auto"]),
            submission_id=submission_id, runtime_env=runtime_env,
            metadata={"stage": stage, "run_name": cfg.run_name, "code": runtime_env["env_vars"][CODE_ENV]})
    if log is not None:
        log.info("submitted %s as Ray job %s to %s (code %s)", stage, submission_id, dashboard,
                 runtime_env["env_vars"][CODE_ENV])
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (status := client.get_job_status(submission_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                     JobStatus.STOPPED):
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(submission_id)
            raise StageError(f"{stage}: Ray job {submission_id} at {dashboard} did not finish in {timeout_s:.0f}s; stopped")
        time.sleep(poll_s)
    logs = client.get_job_logs(submission_id)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(submission_id)
        tail = "\n".join(logs.strip().splitlines()[-20:])
        raise StageError(f"{stage}: Ray job {submission_id} at {dashboard} {status.value}: {info.message or ''}\n{tail}")
    for line in reversed(logs.strip().splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            if isinstance(result, dict) and "run_id" in result:
                return {**result, "ray_job_id": submission_id}
    raise StageError(f"{stage}: Ray job {submission_id} succeeded but printed no result line")


def _known_secrets(cfg: Config, environ: dict[str, str]) -> list[str]:
    values = [s.get_secret_value() for s in (cfg.storage.access_key_id, cfg.storage.secret_access_key) if s]
    values += [environ[name] for name in SECRET_ENV if environ.get(name)]
    if cfg.warehouse.catalog_password_env and environ.get(cfg.warehouse.catalog_password_env):
        values.append(environ[cfg.warehouse.catalog_password_env])
    # Very short values would match by accident; no real key or password is that short.
    return [v for v in values if len(v) >= 6]


def check_no_secrets(argv: list[str], *, cfg: Config, environ: dict[str, str]) -> None:
    """Refuse a command holding a known secret value; the message names the argument, never the value."""
    secrets = _known_secrets(cfg, environ)
    for i, arg in enumerate(argv):
        if any(s in arg for s in secrets):
            where = f"argument {arg.split('=', 1)[0]}=…" if "=" in arg else f"argument {i}"
            raise SubmitError(f"refusing to submit: {where} would carry a secret on the command line; keep "
                              f"credentials in the environment or storage.credentials_file")


def build_submission(stage: str, *, config: str, overrides: list[str], no_wait: bool = False,
                     address: str | None = None, project_dir: str | None = None, jobs_dir: str | None = None,
                     python: str = "python", environ: dict[str, str] | None = None) -> Submission:
    """Validate the request and build the submitter's command (nothing runs)."""
    if stage not in STAGES:
        raise SubmitError(f"unknown stage {stage!r}; stages: {', '.join(SPARK_STAGES)} (Spark), "
                          f"{', '.join(RAY_STAGES)} (Ray)")
    environ = dict(os.environ if environ is None else environ)
    for pair in overrides:
        key = pair.split("=", 1)[0].strip()
        if key in SECRET_OVERRIDES or looks_secret(key):
            raise SubmitError(f"refusing override {key}: a secret on the command line is visible to every "
                              f"process listing and log; use AWS_* environment variables or storage.credentials_file")
    path = Path(config)
    if not path.is_file():
        raise SubmitError(f"config file not found: {config}")
    cfg = load_config(path, overrides=overrides, environ=environ)
    project = Path(project_dir).resolve() if project_dir else default_project_dir()
    jobs = jobs_dir or str(project / "jobs")
    # A config inside the checkout travels with a Ray job's working directory (relative path);
    # anything else must exist at the same absolute path where the driver runs.
    resolved = path.resolve()
    try:
        inside = str(resolved.relative_to(project)) if stage in RAY_STAGES else None
    except ValueError:
        inside = None
    config_arg = inside or str(resolved)
    if stage in SPARK_STAGES:
        sub = spark_command(stage, cfg=cfg, config_arg=config_arg, overrides=list(overrides), jobs_dir=jobs,
                            no_wait=no_wait, project=project)
    else:
        sub = ray_command(stage, cfg=cfg, config_arg=config_arg, overrides=list(overrides), jobs_dir=jobs,
                          no_wait=no_wait, project=project, address=address, python=python)
    check_no_secrets(sub.argv, cfg=cfg, environ=environ)
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = RedactingArgumentParser(
        prog="deepcontent submit",
        description="Submit one stage to a cluster: Spark stages with spark-submit, Ray stages with "
        "`ray job submit`, configured by a cluster config file.",
        epilog=f"Spark stages: {', '.join(SPARK_STAGES)}. Ray stages: {', '.join(RAY_STAGES)}. "
        "Overrides (key.path=value) apply to building the command and are passed on to the job. "
        "Secrets are never put on the command line: the cluster gets S3 keys from its environment "
        "or storage.credentials_file.",
    )
    parser.add_argument("stage", metavar="STAGE", help="the stage to run on the cluster")
    parser.add_argument("--config", "-c", required=True, help="cluster config YAML (read here and by the job)")
    parser.add_argument("--dry-run", action="store_true", help="print the submit command on one line and exit")
    parser.add_argument("--no-wait", action="store_true",
                        help="return once submitted (Ray stages; Spark stages in cluster deploy mode)")
    parser.add_argument("--address", default=None,
                        help=f"Ray job-submission address (default: ray.address), e.g. http://head:{RAY_DASHBOARD_PORT}")
    parser.add_argument("--project-dir", default=None,
                        help="checkout holding jobs/, uploaded as a Ray job's working directory "
                        "(default: the checkout deepcontent runs from)")
    parser.add_argument("--jobs-dir", default=None,
                        help="where the Spark driver finds jobs/<stage>.py (default: <project-dir>/jobs); "
                        "a URI such as local:///opt/deepcontent/jobs for cluster deploy mode")
    parser.add_argument("--python", default="python", help="interpreter that runs a Ray job's entry point on the cluster")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="DEBUG lines and a failure's full traceback")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines on stderr as text (default) or one JSON object per line")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    return parser


def main(argv: list[str]) -> int:
    """``deepcontent submit`` with ``argv`` after the word ``submit``; returns the exit status."""
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO, fmt=args.log_format)
    try:
        sub = build_submission(args.stage, config=args.config, overrides=args.overrides, no_wait=args.no_wait,
                               address=args.address, project_dir=args.project_dir, jobs_dir=args.jobs_dir,
                               python=args.python)
    except (SubmitError, ConfigError) as exc:
        log.debug("deepcontent submit failed here:", exc_info=True)
        print(redact_text(f"deepcontent submit: {exc}"), file=sys.stderr)
        return getattr(exc, "code", 2)
    if args.dry_run:
        print(redact_text(sub.shell()))
        return 0
    missing = ray_jobs_client_missing() if sub.engine == "ray" else []
    if missing:
        print(f"deepcontent submit: `ray job submit` needs the Ray jobs client from ray[default] "
              f"(pip install 'ray[default]'); missing here: {', '.join(missing)}", file=sys.stderr)
        return 2
    log.info("submit: %s (%s) -> %s", sub.stage, sub.engine, sub.shell())
    env = {**os.environ, **sub.env}
    try:
        rc = subprocess.run(sub.argv, cwd=sub.cwd, env=env, check=False).returncode
    except OSError as exc:
        print(f"deepcontent submit: cannot run {sub.argv[0]}: {exc}", file=sys.stderr)
        return 127
    if rc != 0:
        submitter = "spark-submit" if sub.engine == "spark" else "ray job submit"
        print(f"deepcontent submit: {sub.stage} failed: {submitter} exited with status {rc} (its output is above)",
              file=sys.stderr)
    # A submitter killed by a signal reports -N; the shell convention is 128 + N.
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
