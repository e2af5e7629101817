"""The cluster files in infra/, checked statically (no Docker, Kubernetes or Airflow here):

* every manifest parses, has the kind and apiVersion its operator expects, and runs a
  ``jobs/<stage>.py`` that exists, with overrides the typed config accepts;
* every Spark stage has a SparkApplication, train/embed/neighbors a RayJob, train on GPUs;
* credentials come from Kubernetes Secrets only: no literal secret in any file;
* every manifest validates against the CRD schema of its operator (vendored under
  infra/schemas, checked with ``jsonschema``; tests/k8s_schemas.py);
* the Spark and Ray versions the manifests name are the pins of constraints.txt, the lock that
  ``make`` and the Dockerfile install from, and this environment was installed from it;
* the Dockerfile's inputs exist and the entry point script is valid bash.

The Airflow DAG is imported into a real DagBag by tests/test_airflow_dag.py.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import re
import tomllib
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import k8s_schemas

from deepcontent.config import load_config
from deepcontent.submit import RAY_STAGES, SPARK_STAGES, STAGES

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
MANIFESTS = sorted((INFRA / "k8s").glob("*.yaml"))
CONSTRAINTS = REPO / "constraints.txt"
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
    assert {f"rayjob-{s}.yaml" for s in ("train", "embed", "neighbors", "maintain")} <= names
    # every stage of the nightly has a manifest: the Airflow DAG runs each from its own
    nightly = load_config(EXAMPLE, environ={}).nightly.stages
    assert all(f"spark-{s}.yaml" in names or f"rayjob-{s}.yaml" in names for s in nightly)
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
        if path.is_file() and "__pycache__" not in path.parts:
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


# ---- manifests against the operators' CRD schemas -------------------------------------------------

# The operator releases whose CRDs are vendored under infra/schemas (infra/schemas/README.md):
# KubeRay 1.5.1 is the oldest release with the RayJob fields the manifests use (authOptions).
CRD_RELEASES = {"kuberay": "v1.5.1", "spark-operator": "v2.5.2"}
CRD_FILES = {"kuberay": ["ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml"],
             "spark-operator": ["sparkoperator.k8s.io_sparkapplications.yaml"]}


def _vendored_or_fail() -> dict:
    missing = [f"infra/schemas/{op}/{rel}/{name}" for op, rel in CRD_RELEASES.items() for name in CRD_FILES[op]
               if not (k8s_schemas.SCHEMAS / op / rel / name).is_file()]
    if missing and k8s_schemas.SCHEMAS == INFRA / "schemas":
        pytest.fail("vendored CRD schemas missing (see infra/schemas/README.md for their sources): " + ", ".join(missing))
    return k8s_schemas.load_crd_schemas(k8s_schemas.SCHEMAS)


def test_the_vendored_crds_are_one_release_per_operator_and_cover_every_manifest_kind():
    schemas = _vendored_or_fail()
    if k8s_schemas.SCHEMAS == INFRA / "schemas":
        assert k8s_schemas.releases() == {op: [rel] for op, rel in CRD_RELEASES.items()}
        readme = (INFRA / "schemas" / "README.md").read_text()
        for op, rel in CRD_RELEASES.items():
            for name in CRD_FILES[op]:  # unchanged copies of the upstream files the README names
                row = re.search(rf"^\| `{re.escape(f'{op}/{rel}/{name}')}` \|.*`([0-9a-f]{{64}})` \|$", readme, re.M)
                assert row, f"infra/schemas/README.md does not name the source of {op}/{rel}/{name}"
                digest = hashlib.sha256((INFRA / "schemas" / op / rel / name).read_bytes()).hexdigest()
                assert digest == row.group(1), f"infra/schemas/{op}/{rel}/{name} differs from the upstream file"
    kinds = {(d["apiVersion"], d["kind"]) for p in MANIFESTS for d in _docs(p)}
    assert kinds <= set(schemas), kinds - set(schemas)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_its_operators_crd(path):
    _vendored_or_fail()
    for doc in _docs(path):
        errors = k8s_schemas.validate(doc)
        assert not errors, f"{path.name} against {doc['kind']} {doc['apiVersion']}:\n  " + "\n  ".join(errors)


def test_the_schema_check_is_strict_about_fields_and_types():
    """What `kubectl apply` would refuse, the check refuses too: an unknown field (a typo), a
    wrong type, a value outside an enum."""
    _vendored_or_fail()
    spark = _docs(INFRA / "k8s" / "spark-ingest.yaml")[0]
    spark["spec"]["driver"]["memroy"] = "8g"
    spark["spec"]["executor"]["instances"] = "ten"
    spark["spec"]["mode"] = "everywhere"
    errors = "\n".join(k8s_schemas.validate(spark))
    assert "'memroy' was unexpected" in errors and "spec.executor.instances" in errors and "spec.mode" in errors
    ray = _docs(INFRA / "k8s" / "rayjob-embed.yaml")[0]
    ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    ray["spec"]["shutdownAfterJobFinish"] = True
    errors = "\n".join(k8s_schemas.validate(ray))
    assert "'shutdownAfterJobFinish' was unexpected" in errors and "containers.0.imagePullPolicy" in errors
    # int-or-string quantities and preserved free-form fields stay accepted
    ray = _docs(INFRA / "k8s" / "rayjob-embed.yaml")[0]
    ray["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 4
    assert k8s_schemas.validate(ray) == []
    assert k8s_schemas.validate({"apiVersion": "ray.io/v9", "kind": "RayJob"})[0].startswith("no vendored CRD")


# ---- pinned builds -------------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and ";" not in line, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_manifests_name_the_pinned_spark_and_ray_and_the_projects_image():
    pins = _pins()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for path in MANIFESTS:
        doc = _docs(path)[0]
        if doc["kind"] == "SparkApplication":
            assert doc["spec"]["sparkVersion"] == pins["pyspark"], (path.name, doc["spec"]["sparkVersion"], pins["pyspark"])
        else:
            ray_version = doc["spec"]["rayClusterSpec"]["rayVersion"]
            assert ray_version == pins["ray"], (path.name, ray_version, pins["ray"])
        images = {n["image"] for n in _walk(doc) if isinstance(n, dict) and isinstance(n.get("image"), str)}
        assert images and all(i.rsplit(":", 1)[1].split("-")[0] == version for i in images), (path.name, images)


def test_the_lock_pins_every_dependency_within_pyproject_and_installs_are_made_from_it():
    pins = _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":  # pinned apart (CPU or CUDA build): TORCH_SPEC / TORCH_VERSION
            continue
        assert name in pins, f"constraints.txt has no pin for {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {spec!r}"
    assert "torch" not in pins and canonicalize_name(project["name"]) not in pins
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^CONSTRAINTS := constraints\.txt$", makefile, re.M)
    assert re.search(r"^\$\(VENV\)/\.installed: pyproject\.toml \$\(CONSTRAINTS\)$", makefile, re.M)  # re-install on change
    assert re.search(r'pip install --quiet -c \$\(CONSTRAINTS\) -e "\.\[test\]"', makefile)
    torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", makefile, re.M).group(1)
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    assert re.search(r"pip install -c constraints\.txt -e \.", dockerfile)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch)}$", dockerfile, re.M)
    assert "ray[default,client]" not in dockerfile and "[client]" not in dockerfile  # no Ray Client anywhere


def test_this_environment_is_the_lock():
    """What `make setup` installed from constraints.txt: every pinned package that is installed
    here has its pinned version (a drifted .venv: `make setup` after touching constraints.txt)."""
    pins = _pins()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    for name in ("pyspark", "ray"):
        assert installed.get(name) == pins[name], (name, installed.get(name), pins[name])
    drift = {n: (installed[n], v) for n, v in pins.items() if n in installed and installed[n] != v}
    assert not drift, f"installed != constraints.txt: {drift}"
