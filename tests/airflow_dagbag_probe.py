"""Run inside an Airflow virtualenv (``make airflow-env``): import a DAG file into a real DagBag
and print what tests/test_airflow_dag.py checks, as one JSON object on the last line.

    .venv-airflow/bin/python tests/airflow_dagbag_probe.py infra/airflow/deepcontent_nightly.py

Airflow's home is a fresh temporary folder (no database is needed to parse DAGs), so nothing of
an operator's Airflow installation is read or written.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import warnings


def _schedule(dag) -> str:
    """The cron expression (Airflow 3 keeps it as ``dag.schedule``, Airflow 2 in the timetable)."""
    schedule = getattr(dag, "schedule", None)
    if isinstance(schedule, str):
        return schedule
    return getattr(dag.timetable, "summary", None) or getattr(dag.timetable, "_expression", None) or str(schedule)


def main(dag_file: str) -> dict:
    home = tempfile.mkdtemp(prefix="airflow-home-")
    os.environ["AIRFLOW_HOME"] = home
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.dirname(os.path.abspath(dag_file))
    import airflow

    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3.1+
    except ImportError:
        from airflow.models.dagbag import DagBag

    kwargs = {"dag_folder": dag_file, "safe_mode": False}
    if "include_examples" in inspect.signature(DagBag.__init__).parameters:  # Airflow 2 (3.x: a setting)
        kwargs["include_examples"] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bag = DagBag(**kwargs)
    # warnings raised by the DAG file itself (Airflow records them per file as it parses)
    dag_warnings = [f"{w.category.__name__}: {w.message}" for w in caught
                    if os.path.abspath(w.filename) == os.path.abspath(dag_file)]
    dag_warnings += [str(w) for f, ws in (getattr(bag, "captured_warnings", None) or {}).items() for w in ws]
    out: dict = {"airflow": airflow.__version__, "import_errors": {k: str(v) for k, v in bag.import_errors.items()},
                 "dag_warnings": dag_warnings, "dags": {}}
    for dag_id, dag in bag.dags.items():
        tasks = {}
        for t in dag.tasks:
            manifest = getattr(t, "template_spec", None) or getattr(t, "manifest", None)
            tasks[t.task_id] = {
                "operator": type(t).__name__,
                "bases": [c.__module__ + "." + c.__name__ for c in type(t).__mro__],
                "retries": t.retries,
                "upstream": sorted(t.upstream_task_ids),
                "downstream": sorted(t.downstream_task_ids),
                "outlets": [{"uri": getattr(o, "uri", None), "name": getattr(o, "name", None),
                             "type": type(o).__name__} for o in t.outlets],
                "namespace": getattr(t, "namespace", None),
                "kubernetes_conn_id": getattr(t, "kubernetes_conn_id", None),
                "execution_timeout_s": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                "manifest": json.loads(json.dumps(manifest, default=str)),  # before exercise() touches it
            }
        out["dags"][dag_id] = {
            "schedule": _schedule(dag),
            "catchup": dag.catchup,
            "max_active_runs": dag.max_active_runs,
            "fileloc": dag.fileloc,
            "tasks": tasks,
        }
    out["exercised"] = exercise(bag)
    return out


class FakeKubernetesHook:
    """Stands in for the provider's KubernetesHook: records calls, answers get_custom_object
    with the statuses it was given, one per poll."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.calls = []

    def create_custom_object(self, **kw):
        self.calls.append(["create", kw["group"], kw["version"], kw["plural"], kw["namespace"], kw["body"]["metadata"]["name"],
                           kw["body"]["spec"].get("backoffLimit")])

    def get_custom_object(self, **kw):
        self.calls.append(["get", kw["name"]])
        return {"status": self.statuses.pop(0)}

    def delete_custom_object(self, **kw):
        self.calls.append(["delete", kw["name"]])


def exercise(bag) -> dict:
    """Run the parts of the tasks that need no cluster: the body each SparkKubernetesOperator
    would create (through the provider's own CustomObjectLauncher) and each RayJobOperator
    against a fake Kubernetes API, once succeeding and once failing."""
    from airflow.providers.cncf.kubernetes.operators.custom_object_launcher import CustomObjectLauncher

    out: dict = {"spark": {}, "ray": {}}
    for dag in bag.dags.values():
        for t in dag.tasks:
            if type(t).__name__ == "SparkKubernetesOperator":
                launcher = CustomObjectLauncher(name=f"{t.task_id}-test", namespace=t.namespace, kube_client=None,
                                                custom_obj_api=None, template_body=t.template_body)
                body = launcher.body
                out["spark"][t.task_id] = {"apiVersion": body["apiVersion"], "kind": body["kind"],
                                           "plural": launcher.plural, "metadata": body["metadata"],
                                           "restartPolicy": body["spec"].get("restartPolicy"),
                                           "mainApplicationFile": body["spec"].get("mainApplicationFile")}
            elif type(t).__name__ == "RayJobOperator":
                runs = {}
                for case, final in (("succeeded", {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                                                   "jobId": "raysubmit_1", "rayClusterName": "c"}),
                                    ("failed", {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED",
                                                "message": "job exited with 1"})):
                    hook = FakeKubernetesHook([{"jobDeploymentStatus": "Initializing"},
                                               {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, final])
                    t.poll_interval = 0
                    t._hook = lambda hook=hook: hook
                    context = {"run_id": "scheduled__2026-12-07T02:00:00+00:00",
                               "ti": type("TI", (), {"try_number": 2})()}
                    try:
                        result, error = t.execute(context), None
                    except Exception as exc:  # noqa: BLE001 - reported to the test
                        result, error = None, f"{type(exc).__name__}: {exc}"
                    runs[case] = {"result": result, "error": error, "calls": hook.calls}
                out["ray"][t.task_id] = runs
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), default=str))
