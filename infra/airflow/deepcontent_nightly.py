"""Airflow DAG: the nightly deepcontent run, once a day.

``deepcontent submit nightly --config /etc/deepcontent/cluster.yaml`` runs in a pod from the
deepcontent image (KubernetesPodOperator). The nightly job takes new or changed catalog entries
through ingest -> spectrograms -> embed -> neighbors with the production model and writes a run
summary under ``runs/nightly/``. It is idempotent: a retry after a failure, or a second run of the
same day, publishes nothing twice, so Airflow's retries are safe.

The pod is the Spark driver (client mode; the config's ``spark.master`` is the Kubernetes API), so
executors must reach it and be owned by it: the pod's IP and name go to Spark through the
``$(POD_IP)`` / ``$(POD_NAME)`` arguments, which Kubernetes expands from the downward-API
variables below. Its service account needs rights to create and delete executor pods.

No secret appears here: S3 keys come from the Kubernetes Secret ``deepcontent-s3`` as environment
variables, the catalog password from ``deepcontent-catalog``, and the config from the ConfigMap
``deepcontent-config`` (see infra/README.md).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from kubernetes.client import models as k8s

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.7+
    from airflow import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

IMAGE = "registry.example.com/ml/deepcontent:0.1.0"
NAMESPACE = "ml"
CONFIG = "/etc/deepcontent/cluster.yaml"


def _from_pod(field_path: str) -> k8s.V1EnvVarSource:
    return k8s.V1EnvVarSource(field_ref=k8s.V1ObjectFieldSelector(field_path=field_path))


with DAG(
    dag_id="deepcontent_nightly",
    description="deepcontent nightly: ingest -> spectrograms -> embed -> neighbors for new or changed tracks",
    schedule="0 2 * * *",  # 02:00 UTC daily, after the catalog's daily drop
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,  # one run covers everything new since the last, so missed days need no backfill
    max_active_runs=1,  # two nightly runs at once would only race to publish the same outputs
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(minutes=15),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(hours=8),
    },
    tags=["deepcontent", "embeddings"],
) as dag:
    KubernetesPodOperator(
        task_id="submit_nightly",
        name="deepcontent-nightly",
        namespace=NAMESPACE,
        image=IMAGE,
        cmds=["deepcontent"],
        arguments=[
            "submit", "nightly", "--config", CONFIG,
            "spark.conf.spark.driver.host=$(POD_IP)",
            "spark.conf.spark.kubernetes.driver.pod.name=$(POD_NAME)",
        ],
        env_vars=[
            k8s.V1EnvVar(name="POD_IP", value_from=_from_pod("status.podIP")),
            k8s.V1EnvVar(name="POD_NAME", value_from=_from_pod("metadata.name")),
            k8s.V1EnvVar(
                name="DEEPCONTENT_CATALOG_PASSWORD",
                value_from=k8s.V1EnvVarSource(
                    secret_key_ref=k8s.V1SecretKeySelector(name="deepcontent-catalog", key="password")),
            ),
        ],
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name="deepcontent-s3"))],
        volumes=[k8s.V1Volume(name="config", config_map=k8s.V1ConfigMapVolumeSource(name="deepcontent-config"))],
        volume_mounts=[k8s.V1VolumeMount(name="config", mount_path="/etc/deepcontent", read_only=True)],
        service_account_name="deepcontent-spark",
        container_resources=k8s.V1ResourceRequirements(requests={"cpu": "4", "memory": "16Gi"},
                                                       limits={"memory": "16Gi"}),
        get_logs=True,
        startup_timeout_seconds=600,
        on_finish_action="delete_succeeded_pod",
    )
