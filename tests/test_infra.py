"""The cluster files in infra/, checked statically (no Docker, Kubernetes or Airflow here):

* every manifest parses, has the kind and apiVersion its operator expects, and runs a
  ``jobs/<stage>.py`` that exists, with overrides the typed config accepts;
* every Spark stage has a SparkApplication, train/embed/neighbors a RayJob, train on GPUs;
* credentials come from Kubernetes Secrets only: no literal secret in any file;
* the Airflow DAG compiles and calls ``deepcontent submit`` with a known stage daily, with retries;
* the Dockerfile's inputs exist and the entry point script is valid bash.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from deepcontent.config import load_config
from deepcontent.submit import RAY_STAGES, SPARK_STAGES, STAGES

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml"))
DAG = INFRA / "airflow" / "deepcontent_nightly.py"
EXAMPLE = REPO / "conf" / "cluster.example.yaml"
CONFIG_PATH = "/etc/deepcontent/cluster.yaml"
KINDS = {"SparkApplication": "sparkoperator.k8s.io/v1beta2", "RayJob": "ray.io/v1"}
JOB = re.compile(r"(?:^|[/ ])jobs/([a-z_]+)\.py\b")
# Environment variables that hold credentials: they must come from a Secret, never a literal.
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|CREDENTIAL", re.I)
# Shapes of real credentials: AWS access key ids, and a 40-character secret key after a key name.
LITERAL_SECRETS = [re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
                   re.compile(r"(?i)secret[_-]?access[_-]?key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{40}"),
                   re.compile(r"(?i)password\s*[:=]\s*['\"][^'\"$]+['\"]")]


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _command(doc: dict) -> tuple[str, list[str]]:
    """``(job file reference, arguments after it)`` of a SparkApplication or RayJob."""
    spec = doc["spec"]
    if doc["kind"] == "SparkApplication":
        return spec["mainApplicationFile"], list(spec.get("arguments", []))
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python", spec["entrypoint"]
    return words[1], words[2:]


def test_there_are_manifests_for_every_cluster_stage():
    names = {p.name for p in MANIFESTS}
    assert {f"spark-{s}.yaml" for s in SPARK_STAGES} <= names
    assert {f"rayjob-{s}.yaml" for s in ("train", "embed", "neighbors")} <= names
    for p in MANIFESTS:
        kind, stage = p.stem.split("-", 1)
        assert kind in ("spark", "rayjob") and stage in STAGES, p.name
        assert stage in (SPARK_STAGES if kind == "spark" else RAY_STAGES), p.name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_runs_an_existing_job_with_a_valid_config(path):
    docs = _docs(path)
    assert len(docs) == 1, f"{path.name}: one resource per file"
    doc = docs[0]
    assert KINDS.get(doc["kind"]) == doc["apiVersion"], (path.name, doc["kind"], doc["apiVersion"])
    stage = path.stem.split("-", 1)[1]
    assert doc["metadata"]["name"] == f"deepcontent-{stage}"
    assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == stage

    job, args = _command(doc)
    assert JOB.search(job) and JOB.search(job).group(1) == stage, job
    assert job.endswith(f"/opt/deepcontent/jobs/{stage}.py")  # the image's copy of jobs/
    assert (REPO / "jobs" / f"{stage}.py").is_file(), f"{path.name} runs jobs/{stage}.py, which does not exist"
    assert args[:2] == ["--config", CONFIG_PATH], args
    overrides = args[2:]
    if doc["kind"] == "RayJob":
        assert "ray.address=auto" in overrides  # join the cluster KubeRay made for the job
    load_config(EXAMPLE, overrides=overrides, environ={})  # every override names a real, valid key

    # the config file the job reads is mounted where the arguments say
    mounts = [m for n in _walk(doc) if isinstance(n, dict) for m in n.get("volumeMounts", [])]
    assert mounts and all(m["mountPath"] == "/etc/deepcontent" and m.get("readOnly") for m in mounts)
    assert any(v.get("configMap", {}).get("name") == "deepcontent-config"
               for n in _walk(doc) if isinstance(n, dict) for v in n.get("volumes", []))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_takes_credentials_from_secrets_only(path):
    text = path.read_text()
    for pattern in LITERAL_SECRETS:
        assert not pattern.search(text), f"{path.name}: literal secret matching {pattern.pattern}"
    docs = _docs(path)
    assert all(d["kind"] != "Secret" for d in docs)
    env_from = [e for n in _walk(docs) if isinstance(n, dict) for e in n.get("envFrom", [])]
    env = [e for n in _walk(docs) if isinstance(n, dict) for e in n.get("env", [])]
    assert env_from and all(set(e) == {"secretRef"} for e in env_from)
    assert {e["secretRef"]["name"] for e in env_from} == {"deepcontent-s3"}
    for var in env:
        if SECRET_NAME.search(var["name"]):
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], f"{path.name}: {var['name']} is a literal"
    # every pod that runs the code gets the S3 keys (Spark driver + executors, Ray head + workers)
    doc = docs[0]
    if doc["kind"] == "SparkApplication":
        pods = [doc["spec"]["driver"], doc["spec"]["executor"]]
    else:
        cluster = doc["spec"]["rayClusterSpec"]
        pods = [c for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
                for c in g["template"]["spec"]["containers"]]
    assert all(p.get("envFrom") for p in pods), path.name


def test_training_runs_one_worker_per_gpu():
    doc = _docs(INFRA / "k8s" / "rayjob-train.yaml")[0]
    _, args = _command(doc)
    assert "train.use_gpu=true" in args
    workers = int(next(a.split("=", 1)[1] for a in args if a.startswith("train.num_workers=")))
    groups = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_pods = 0
    for g in groups:
        (container,) = g["template"]["spec"]["containers"]
        if container["resources"]["limits"].get("nvidia.com/gpu") == 1:
            gpu_pods += g["replicas"]
    assert gpu_pods == workers, (gpu_pods, workers)
    assert load_config(EXAMPLE, overrides=args[2:], environ={}).train.use_gpu


def _dag_operator_call() -> ast.Call:
    tree = ast.parse(DAG.read_text(), filename=str(DAG))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "KubernetesPodOperator"]
    assert len(calls) == 1
    return calls[0]


def test_the_nightly_dag_compiles_and_submits_a_known_stage_daily_with_retries():
    source = DAG.read_text()
    compile(source, str(DAG), "exec")  # Airflow is not installed here: syntax, not import
    call = _dag_operator_call()
    kw = {k.arg: k.value for k in call.keywords}
    cmd = ast.literal_eval(kw["cmds"]) + ast.literal_eval(ast.unparse(kw["arguments"]).replace("CONFIG", repr(CONFIG_PATH)))
    assert cmd[:3] == ["deepcontent", "submit", "nightly"] and cmd[2] in STAGES
    assert cmd[3:5] == ["--config", CONFIG_PATH]
    load_config(EXAMPLE, overrides=cmd[5:], environ={})
    assert re.search(r'schedule="0 2 \* \* \*"', source)  # daily
    assert re.search(r'"retries":\s*[1-9]', source)
    for pattern in LITERAL_SECRETS:
        assert not pattern.search(source)
    # credentials by reference only: the Secret for env_from, a secretKeyRef for the password
    assert "secret_ref=k8s.V1SecretEnvSource(name=\"deepcontent-s3\")" in source
    assert not re.search(r"V1EnvVar\(name=\"[A-Z_]*(KEY|SECRET|PASSWORD|TOKEN)[A-Z_]*\",\s*value=", source)


def test_the_dockerfile_copies_what_exists_and_runs_deepcontent():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "openjdk-17-jre-headless" in text
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M) and re.search(r"^ARG TORCH_INDEX_URL=.*/cpu$", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _ = line.split()
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1)
    assert ast.literal_eval(entry)[-1] == "/usr/local/bin/deepcontent-entrypoint"
    script = (INFRA / "entrypoint.sh").read_text()
    assert 'exec deepcontent "$@"' in script
    subprocess.run(["bash", "-n", str(INFRA / "entrypoint.sh")], check=True)


def test_no_file_in_infra_holds_a_literal_secret():
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for pattern in LITERAL_SECRETS:
                assert not pattern.search(text), f"{path.relative_to(REPO)}: {pattern.pattern}"


RAYJOBS = [p for p in MANIFESTS if p.name.startswith("rayjob-")]


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_job_api_is_not_open_to_the_pod_network(path):
    """The job API is code execution with the job's S3 keys: bound to the pod's address, behind
    token auth, and every Ray pod and the submitter carry the label the NetworkPolicy admits."""
    doc = _docs(path)[0]
    cluster = doc["spec"]["rayClusterSpec"]
    assert cluster.get("authOptions", {}).get("mode") == "token", path.name
    host = cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host")
    assert host == "$MY_POD_IP", f"{path.name}: dashboard-host {host!r}"
    assert "0.0.0.0" not in path.read_text()
    templates = [cluster["headGroupSpec"]["template"], doc["spec"]["submitterPodTemplate"]]
    templates += [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    for t in templates:
        assert t["metadata"]["labels"]["app.kubernetes.io/name"] == "deepcontent", path.name


def test_network_policy_admits_only_the_jobs_pods_to_the_ray_control_plane():
    docs = _docs(INFRA / "k8s" / "policies" / "networkpolicy-ray.yaml")
    assert len(docs) == 1 and docs[0]["kind"] == "NetworkPolicy"
    spec = docs[0]["spec"]
    assert spec["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert spec["policyTypes"] == ["Ingress"]
    job_api = [r for r in spec["ingress"] if any(p["port"] == 8265 for p in r["ports"])]
    assert len(job_api) == 1
    assert job_api[0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "deepcontent"}}}]
    namespaces = {doc["metadata"]["namespace"] for p in RAYJOBS for doc in _docs(p)}
    assert namespaces == {docs[0]["metadata"]["namespace"]}
    assert "networkpolicy-ray.yaml" in (INFRA / "README.md").read_text()
