"""Airflow DAG: the nightly deepcontent run, once a day, one task per stage.

The tasks are the stages of the nightly job (``nightly.stages`` in conf/base.yaml), in its order::

    ingest -> spectrograms -> embed -> neighbors -> maintain
    (Spark)   (Spark)         (Ray)    (Ray)        (Ray)

* **Spark stages** run as Spark operator ``SparkApplication``\\ s (``SparkKubernetesOperator``),
  each from its manifest ``infra/k8s/spark-<stage>.yaml``; the task follows the driver pod and
  its log, and deletes the application when it ends.
* **Ray stages** run as KubeRay ``RayJob``\\ s from ``infra/k8s/rayjob-<stage>.yaml``
  (:class:`RayJobOperator` below): KubeRay starts a Ray cluster from the image, submits the
  stage through the Ray Jobs API and tears the cluster down; the task waits for the job's end.
  Nothing uses Ray Client.

Each task has retries of its own, so a failure re-runs that stage only; every stage is
incremental (a re-run with nothing new publishes nothing), which makes the retries safe. The
operators' own restart policies (the SparkApplication's ``restartPolicy``, the RayJob's
``backoffLimit``) are switched off here so that a failure is retried in one place, by Airflow.

``embed`` and ``neighbors`` publish the Iceberg tables ``embeddings`` and ``similar_tracks``;
their tasks carry those tables as outlets (Airflow 3 assets, Airflow 2 datasets), so a
downstream DAG can be scheduled on new embeddings::

    with DAG("my_index_refresh", schedule=[Asset(name="deepcontent.similar_tracks", uri=SIMILAR_TRACKS_URI)]): ...

Runs on Airflow 2.9+ and 3.x with ``apache-airflow-providers-cncf-kubernetes`` (10.x;
tests/test_airflow_dag.py imports it into a real DagBag on Airflow 2.11 and 3.3). Deploy it with
the manifests beside it::

    <dags>/deepcontent/deepcontent_nightly.py
    <dags>/deepcontent/k8s/*.yaml            # infra/k8s (or set DEEPCONTENT_MANIFESTS)

The manifests carry the image, namespace, service account and sizes; no secret appears in them
or here (S3 keys from the Secret ``deepcontent-s3``, the catalog password from
``deepcontent-catalog``, the config from the ConfigMap ``deepcontent-config``; infra/README.md).
Airflow reaches Kubernetes through the connection ``kubernetes_default`` (in-cluster or a
kubeconfig), whose identity may create and delete SparkApplications and RayJobs in the namespace.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from datetime import timedelta
from pathlib import Path

import pendulum
import yaml

try:  # Airflow 3: the task SDK
    from airflow.sdk import DAG, Asset, BaseOperator
except ImportError:  # Airflow 2.9+
    from airflow import DAG
    from airflow.datasets import Dataset as _Dataset
    from airflow.models.baseoperator import BaseOperator

    def Asset(name: str, uri: str):  # noqa: N802 - Airflow 3's name for it
        return _Dataset(uri)
from airflow.exceptions import AirflowException
from airflow.providers.cncf.kubernetes.operators.spark_kubernetes import SparkKubernetesOperator

DAG_ID = "deepcontent_nightly"
# The nightly job's stages, in its order (nightly.stages in conf/base.yaml; the DAG test checks).
STAGES = ("ingest", "spectrograms", "embed", "neighbors", "maintain")
# Retries per stage: the Spark stages read the day's catalog drop and object store (transient
# failures), the Ray stages need a fresh GPU cluster (capacity may come later).
RETRIES = {"ingest": 3, "spectrograms": 2, "embed": 3, "neighbors": 2, "maintain": 1}
KUBERNETES_CONN_ID = "kubernetes_default"

# What the nightly publishes, as Airflow assets: the Iceberg tables of the cluster config's
# warehouse (catalog "deepcontent", warehouse.namespace "music_embeddings" in
# conf/cluster.example.yaml). Downstream DAGs schedule on these exact URIs.
EMBEDDINGS_URI = "iceberg://deepcontent/music_embeddings/embeddings"
SIMILAR_TRACKS_URI = "iceberg://deepcontent/music_embeddings/similar_tracks"
EMBEDDINGS = Asset(name="deepcontent.embeddings", uri=EMBEDDINGS_URI)
SIMILAR_TRACKS = Asset(name="deepcontent.similar_tracks", uri=SIMILAR_TRACKS_URI)
OUTLETS = {"embed": [EMBEDDINGS], "neighbors": [SIMILAR_TRACKS]}


def manifests_dir() -> Path:
    """Where the manifests are: ``$DEEPCONTENT_MANIFESTS``, else ``k8s/`` beside this file (the
    DAGs folder layout), else ``../k8s`` (the repository's infra/k8s)."""
    if os.environ.get("DEEPCONTENT_MANIFESTS"):
        return Path(os.environ["DEEPCONTENT_MANIFESTS"])
    here = Path(__file__).resolve().parent
    return next((d for d in (here / "k8s", here.parent / "k8s") if d.is_dir()), here / "k8s")


def load_manifest(stage: str) -> dict:
    """The one resource of ``spark-<stage>.yaml`` or ``rayjob-<stage>.yaml``."""
    folder = manifests_dir()
    paths = [p for p in (folder / f"spark-{stage}.yaml", folder / f"rayjob-{stage}.yaml") if p.is_file()]
    if len(paths) != 1:
        raise FileNotFoundError(f"deepcontent nightly: stage {stage!r} needs exactly one of spark-{stage}.yaml / "
                                f"rayjob-{stage}.yaml in {folder} (found {[p.name for p in paths]}); deploy "
                                f"infra/k8s beside the DAG or set DEEPCONTENT_MANIFESTS")
    (doc,) = [d for d in yaml.safe_load_all(paths[0].read_text()) if d]
    return doc


class RayJobOperator(BaseOperator):
    """Run a KubeRay ``RayJob`` to its end: create it (under a name unique to the DAG run and
    try), wait until KubeRay reports it complete, fail unless the Ray job SUCCEEDED.

    KubeRay submits the entry point through the Ray Jobs API of the cluster it starts for the
    job, and with ``shutdownAfterJobFinishes`` deletes that cluster afterwards. A succeeded
    RayJob is deleted; a failed one is kept for ``kubectl describe`` until its TTL. Killing the
    task (timeout, mark failed) deletes the RayJob and with it the cluster.
    """

    template_fields = ("kubernetes_conn_id",)
    ui_color = "#7bb9e8"
    TERMINAL = ("Complete", "Failed", "ValidationFailed")

    def __init__(self, *, manifest: dict, kubernetes_conn_id: str = KUBERNETES_CONN_ID,
                 poll_interval: float = 30.0, delete_on_success: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if manifest.get("kind") != "RayJob":
            raise ValueError(f"RayJobOperator needs a RayJob manifest, got {manifest.get('kind')!r}")
        self.manifest = manifest
        self.kubernetes_conn_id = kubernetes_conn_id
        self.poll_interval = poll_interval
        self.delete_on_success = delete_on_success
        self.namespace = manifest["metadata"].get("namespace", "default")
        self._created: str | None = None

    @staticmethod
    def job_name(base: str, run_id: str, try_number: int) -> str:
        """``<base>-<8 hex of the run id>-<try>``: a fresh RayJob per try, within KubeRay's
        47-character limit on RayJob names."""
        digest = hashlib.sha1(run_id.encode()).hexdigest()[:8]
        suffix = f"-{digest}-{try_number}"
        return base[:47 - len(suffix)].rstrip("-") + suffix

    def _hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(conn_id=self.kubernetes_conn_id)

    def _api(self) -> tuple[str, str]:
        group, version = self.manifest["apiVersion"].split("/")
        return group, version

    def execute(self, context):
        hook = self._hook()
        group, version = self._api()
        body = copy.deepcopy(self.manifest)
        name = self.job_name(body["metadata"]["name"], context["run_id"], context["ti"].try_number)
        body["metadata"]["name"] = name
        hook.create_custom_object(group=group, version=version, plural="rayjobs", body=body, namespace=self.namespace)
        self._created = name
        self.log.info("created RayJob %s/%s", self.namespace, name)
        deployment = job = None
        status: dict = {}
        while deployment not in self.TERMINAL:
            time.sleep(self.poll_interval)
            obj = hook.get_custom_object(group=group, version=version, plural="rayjobs", name=name,
                                         namespace=self.namespace)
            status = obj.get("status") or {}
            if (status.get("jobDeploymentStatus"), status.get("jobStatus")) != (deployment, job):
                deployment, job = status.get("jobDeploymentStatus"), status.get("jobStatus")
                self.log.info("RayJob %s: deployment %s, job %s", name, deployment, job)
        if deployment != "Complete" or job != "SUCCEEDED":
            raise AirflowException(f"RayJob {self.namespace}/{name} ended {deployment}, Ray job {job}: "
                                   f"{status.get('message') or status.get('reason') or 'no message'} "
                                   f"(kubectl -n {self.namespace} describe rayjob {name})")
        if self.delete_on_success:
            hook.delete_custom_object(group=group, version=version, plural="rayjobs", name=name, namespace=self.namespace)
            self._created = None
        return {"rayjob": name, "job_id": status.get("jobId"), "ray_cluster": status.get("rayClusterName")}

    def on_kill(self) -> None:
        if self._created:
            group, version = self._api()
            self._hook().delete_custom_object(group=group, version=version, plural="rayjobs", name=self._created,
                                              namespace=self.namespace)


def stage_task(stage: str) -> BaseOperator:
    """The task that runs ``stage`` from its manifest, with its retries and outlets."""
    doc = copy.deepcopy(load_manifest(stage))
    common = dict(task_id=stage, retries=RETRIES[stage], outlets=OUTLETS.get(stage, []))
    namespace = doc["metadata"].get("namespace", "default")
    if doc["kind"] == "SparkApplication":
        doc["spec"]["restartPolicy"] = {"type": "Never"}  # Airflow retries the stage
        return SparkKubernetesOperator(template_spec=doc, namespace=namespace, kubernetes_conn_id=KUBERNETES_CONN_ID,
                                       get_logs=True, delete_on_termination=True, random_name_suffix=True,
                                       startup_timeout_seconds=900, **common)
    if doc["kind"] == "RayJob":
        doc["spec"]["backoffLimit"] = 0  # Airflow retries the stage
        return RayJobOperator(manifest=doc, **common)
    raise ValueError(f"{stage}: unexpected manifest kind {doc['kind']!r}")


with DAG(
    dag_id=DAG_ID,
    description="deepcontent nightly: ingest -> spectrograms -> embed -> neighbors -> maintain, one task per stage",
    schedule="0 2 * * *",  # 02:00 UTC daily, after the catalog's daily drop
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,  # one run covers everything new since the last, so missed days need no backfill
    max_active_runs=1,  # two nightly runs at once would only race to publish the same outputs
    default_args={
        "owner": "ml-platform",
        "retry_delay": timedelta(minutes=10),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(hours=8),
    },
    tags=["deepcontent", "embeddings"],
    doc_md=__doc__,
) as dag:
    tasks = [stage_task(stage) for stage in STAGES]
    for upstream, downstream in zip(tasks, tasks[1:]):
        upstream >> downstream
