"""The nightly Airflow DAG, imported into a real ``DagBag`` on Airflow 3 and Airflow 2.

Airflow lives in virtualenvs of its own (``make airflow-env``, which ``make test`` runs, builds
``.venv-airflow`` with Airflow 3 and ``.venv-airflow2`` with Airflow 2 from the pinned lists in
infra/airflow/), so its pins never meet the package's. ``tests/airflow_dagbag_probe.py`` runs
in each, parses ``infra/airflow/deepcontent_nightly.py`` the way the scheduler does, and reports
the DAG; the checks run here:

* no import error, no warning from the DAG file; daily, no catch-up, one run at a time;
* one task per stage of the nightly job (``nightly.stages``), in its order, each with retries
  of its own: Spark stages as SparkKubernetesOperator with their infra/k8s SparkApplication,
  Ray stages as RayJobOperator with their infra/k8s RayJob (no pod running the whole nightly,
  no Ray Client);
* the tasks that publish ``embeddings`` and ``similar_tracks`` carry them as outlets;
* the provider's own launcher turns each Spark task into the SparkApplication of its manifest,
  and a RayJob task against a fake Kubernetes API creates a fresh RayJob per try, waits for it,
  deletes it on success and fails when the Ray job failed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from deepcontent.config import load_config
from deepcontent.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "infra" / "airflow" / "deepcontent_nightly.py"
PROBE = REPO / "tests" / "airflow_dagbag_probe.py"
EXAMPLE = REPO / "conf" / "cluster.example.yaml"
ENVS = {"airflow3": REPO / ".venv-airflow", "airflow2": REPO / ".venv-airflow2"}
OPERATOR = {"spark": "SparkKubernetesOperator", "ray": "RayJobOperator"}
KIND = {"spark": ("spark", "SparkApplication"), "ray": ("rayjob", "RayJob")}


@pytest.fixture(scope="module", params=sorted(ENVS))
def probe(request) -> dict:
    python = ENVS[request.param] / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{ENVS[request.param].name} is absent: `make airflow-env` builds it (make test does)")
    out = subprocess.run([str(python), str(PROBE), str(DAG_FILE)], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["airflow"].startswith("3." if request.param == "airflow3" else "2."), result["airflow"]
    return result


def _dag(probe: dict) -> dict:
    assert probe["import_errors"] == {}, probe["import_errors"]
    assert list(probe["dags"]) == ["deepcontent_nightly"]
    return probe["dags"]["deepcontent_nightly"]


def test_the_dag_imports_cleanly_and_runs_daily_one_run_at_a_time(probe):
    dag = _dag(probe)
    assert probe["dag_warnings"] == []
    assert dag["schedule"] == "0 2 * * *" and dag["catchup"] is False and dag["max_active_runs"] == 1
    assert Path(dag["fileloc"]).resolve() == DAG_FILE


def test_one_task_per_nightly_stage_in_the_nightly_order_each_with_retries(probe):
    tasks = _dag(probe)["tasks"]
    stages = list(load_config(EXAMPLE, environ={}).nightly.stages)
    assert stages == list(load_config(environ={}).nightly.stages)  # the cluster runs the default order
    assert sorted(tasks) == sorted(stages)
    for i, stage in enumerate(stages):  # a chain: each stage waits for the one before it, only
        assert tasks[stage]["upstream"] == stages[i - 1:i], (stage, tasks[stage]["upstream"])
        assert tasks[stage]["downstream"] == stages[i + 1:i + 2], (stage, tasks[stage]["downstream"])
    for stage, task in tasks.items():
        engine = STAGES[stage].engine
        assert task["operator"] == OPERATOR[engine], (stage, task["operator"])
        assert task["retries"] >= 1, stage
        assert task["namespace"] == "ml" and task["kubernetes_conn_id"] == "kubernetes_default"
        assert task["execution_timeout_s"] and task["execution_timeout_s"] <= 24 * 3600
        prefix, kind = KIND[engine]
        manifest = yaml.safe_load((REPO / "infra" / "k8s" / f"{prefix}-{stage}.yaml").read_text())
        assert task["manifest"]["kind"] == kind
        # the manifest as it is in infra/k8s, with the operator's own retries handed to Airflow
        expected = json.loads(json.dumps(manifest))
        if kind == "SparkApplication":
            expected["spec"]["restartPolicy"] = {"type": "Never"}
        else:
            expected["spec"]["backoffLimit"] = 0
        assert task["manifest"] == expected, stage
        assert "KubernetesPodOperator" not in task["operator"]


def test_the_publishing_tasks_carry_the_tables_as_outlets(probe):
    tasks = _dag(probe)["tasks"]
    namespace = load_config(EXAMPLE, environ={}).warehouse.namespace
    outlets = {stage: [o["uri"] for o in task["outlets"]] for stage, task in tasks.items()}
    assert outlets == {"ingest": [], "spectrograms": [], "maintain": [],
                       "embed": [f"iceberg://deepcontent/{namespace}/embeddings"],
                       "neighbors": [f"iceberg://deepcontent/{namespace}/similar_tracks"]}
    kind = "Asset" if probe["airflow"].startswith("3.") else "Dataset"
    assert {o["type"] for t in tasks.values() for o in t["outlets"]} == {kind}


def test_spark_tasks_create_their_sparkapplication(probe):
    spark = probe["exercised"]["spark"]
    assert sorted(spark) == sorted(s for s in _dag(probe)["tasks"] if STAGES[s].engine == "spark")
    for stage, body in spark.items():
        assert (body["apiVersion"], body["kind"], body["plural"]) == \
            ("sparkoperator.k8s.io/v1beta2", "SparkApplication", "sparkapplications")
        assert body["metadata"]["namespace"] == "ml"
        assert body["restartPolicy"] == {"type": "Never"}
        assert body["mainApplicationFile"] == f"local:///opt/deepcontent/jobs/{stage}.py"


def test_ray_tasks_run_a_fresh_rayjob_per_try_and_fail_with_the_job(probe):
    ray = probe["exercised"]["ray"]
    assert sorted(ray) == sorted(s for s in _dag(probe)["tasks"] if STAGES[s].engine == "ray")
    for stage, runs in ray.items():
        ok, failed = runs["succeeded"], runs["failed"]
        assert ok["error"] is None
        name = ok["result"]["rayjob"]
        assert name.startswith(f"deepcontent-{stage}-") and name.endswith("-2") and len(name) <= 47  # try 2
        assert ok["calls"][0] == ["create", "ray.io", "v1", "rayjobs", "ml", name, 0]
        assert [c[0] for c in ok["calls"]] == ["create", "get", "get", "get", "delete"]
        assert ok["result"]["job_id"] == "raysubmit_1"
        assert failed["result"] is None and "Ray job FAILED" in failed["error"] and "job exited with 1" in failed["error"]
        assert [c[0] for c in failed["calls"]] == ["create", "get", "get", "get"]  # kept for kubectl describe
