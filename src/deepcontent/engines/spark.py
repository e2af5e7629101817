"""Spark session factory. Nothing starts at import; the session is built on first call.

The embedded default is ``local[*]``; a cluster sets ``spark.master`` (standalone, k8s, YARN)
and resources in config. Python workers get one BLAS/OpenMP thread each: Spark already runs one
task per core, and oversubscribed BLAS threads cost far more than they give.
"""

from __future__ import annotations

import os
import sys

from deepcontent.config import SparkConfig

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def spark_session(cfg: SparkConfig):
    """Build (or return the active) SparkSession for ``cfg``."""
    from pyspark.sql import SparkSession

    # Driver and workers must run the same interpreter (the one with deepcontent installed).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # A local session binds loopback rather than guessing an interface (and warning about it).
    if cfg.master.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    if cfg.master.startswith("local-cluster"):
        # Executors of a local cluster are launched from SPARK_HOME: the pyspark package is one.
        import pyspark

        os.environ.setdefault("SPARK_HOME", os.path.dirname(pyspark.__file__))
    builder = SparkSession.builder
    # Under spark-submit the JVM is already up (PYSPARK_GATEWAY_PORT is set) and --master /
    # --conf on the submit line decide; only set the master when we start Spark ourselves.
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(cfg.master)
    builder = (
        builder.appName(cfg.app_name)
        .config("spark.driver.memory", cfg.driver_memory)
        .config("spark.executor.memory", cfg.executor_memory)
        .config("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.showConsoleProgress", "false")
    )
    for key, value in THREAD_ENV.items():
        builder = builder.config(f"spark.executorEnv.{key}", value)
    for key, value in cfg.conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session


def set_task_threads() -> None:
    """Call at the top of a Python task: pin native thread pools to one thread."""
    for key, value in THREAD_ENV.items():
        os.environ[key] = value
