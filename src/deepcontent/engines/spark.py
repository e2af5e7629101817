"""Spark session factory. Nothing starts at import; the session is built on first call.

The embedded default is ``local[*]``; a cluster sets ``spark.master`` (standalone, k8s, YARN)
and resources in config. Python workers get one BLAS/OpenMP thread each: Spark already runs one
task per core, and oversubscribed BLAS threads cost far more than they give.

Under the CLI without ``-v`` (:func:`deepcontent.console.engines_quiet`), when this process
starts the JVM, everything the JVM prints (log4j at INFO, the JVM's own warnings, Python
workers' stderr) goes to ``spark.log`` in :func:`deepcontent.console.engine_log_dir`; its
ERROR / FATAL log lines also reach the console, one line each (the stack trace stays in the
file). Under ``spark-submit`` (the JVM is already up) and with ``-v`` the console gets Spark's
WARN level as before.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from pathlib import Path

from deepcontent import console
from deepcontent.config import SparkConfig

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
LOG_FILE = "spark.log"

# Spark's own default log4j2 profile, with the shell loggers at the root's level: PySpark's
# gateway (PythonGatewayServer) counts as a shell, whose logger's level Spark would otherwise
# make the console's threshold, WARN (and say so).
LOG4J2_PROPERTIES = """\
# written by deepcontent (deepcontent.engines.spark): everything at INFO to the JVM's stderr,
# which deepcontent copies to spark.log beside this file (ERROR lines to the console too)
rootLogger.level = info
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.repl.name = org.apache.spark.repl.Main
logger.repl.level = info
logger.pygateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.pygateway.level = info
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
logger.jetty2.name = org.sparkproject.jetty.util.component.AbstractLifeCycle
logger.jetty2.level = error
logger.parquet.name = org.apache.parquet.CorruptStatistics
logger.parquet.level = error
logger.parquet2.name = parquet.CorruptStatistics
logger.parquet2.level = error
"""
# A log4j line of level ERROR or FATAL (the pattern above): its timestamp, then the rest.
_ERROR_LINE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (?=(?:ERROR|FATAL) )")
jvm_log = logging.getLogger("deepcontent.engines.spark")
# The JVM this process started with its output on the pipe, and the file that output goes to
# (a later session in this process runs on the same JVM).
_quiet_jvm: dict = {}


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
    options: dict[str, str] = {}
    # Under spark-submit the JVM is already up (PYSPARK_GATEWAY_PORT is set) and --master /
    # --conf on the submit line decide; only set the master when we start Spark ourselves.
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        options["spark.master"] = cfg.master
    options.update({
        "spark.app.name": cfg.app_name,
        "spark.driver.memory": cfg.driver_memory,
        "spark.executor.memory": cfg.executor_memory,
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
    })
    for key, value in THREAD_ENV.items():
        options[f"spark.executorEnv.{key}"] = value
    options.update(cfg.conf)
    log_file = _start_quiet_jvm(options) if console.engines_quiet() else None
    builder = SparkSession.builder
    for key, value in options.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    if log_file is None:
        session.sparkContext.setLogLevel("WARN")
    else:  # log4j stays at INFO: it all goes to the file
        console.announce("spark", f"Spark -> {log_file} (its errors are shown here too; -v shows everything)")
    return session


def _start_quiet_jvm(options: dict[str, str]) -> Path | None:
    """Start the JVM gateway with its stdout / stderr on a pipe that :func:`_copy_jvm_output`
    copies to ``spark.log`` (``options`` gains the log4j2 profile); returns the file, or None
    when this process does not start the JVM (spark-submit started it, or it is up already)."""
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway

    if "PYSPARK_GATEWAY_PORT" in os.environ:
        return None
    if SparkContext._gateway is not None:  # up already: ours (its output on the pipe) or not
        return _quiet_jvm.get("log_file") if SparkContext._gateway is _quiet_jvm.get("gateway") else None
    log_dir = console.engine_log_dir()
    log_file = log_dir / LOG_FILE
    java_options = options.get("spark.driver.extraJavaOptions", "")
    if "log4j2.configurationFile" not in java_options and "log4j.configurationFile" not in java_options:
        properties = log_dir / "log4j2.properties"
        properties.write_text(LOG4J2_PROPERTIES)
        options["spark.driver.extraJavaOptions"] = f"{java_options} -Dlog4j2.configurationFile=file:{properties}".strip()
    conf = SparkConf()  # no JVM yet: plain Python settings, passed to spark-submit as --conf
    for key, value in options.items():
        conf.set(key, value)
    read_fd, write_fd = os.pipe()
    copier = threading.Thread(target=_copy_jvm_output, args=(read_fd, log_file), name="spark-jvm-output", daemon=True)
    copier.start()
    try:
        gateway = launch_gateway(conf, popen_kwargs={"stdout": write_fd, "stderr": write_fd})
    except Exception:
        os.close(write_fd)
        copier.join(timeout=5)
        tail = log_file.read_text(errors="replace").splitlines()[-20:] if log_file.exists() else []
        jvm_log.error("spark: the JVM did not start; the end of %s:\n%s", log_file, "\n".join(tail))
        raise
    os.close(write_fd)  # the JVM holds its own copy
    SparkContext._ensure_initialized(gateway=gateway)
    _quiet_jvm.update(gateway=gateway, log_file=log_file)
    return log_file


def _copy_jvm_output(fd: int, path: Path) -> None:
    """Copy the JVM's output to ``path`` line by line; log4j ERROR / FATAL lines also go to the
    console (through the ``deepcontent`` logger: its format, its redaction)."""
    with os.fdopen(fd, "rb") as source, open(path, "ab") as out:
        for raw in source:
            out.write(raw)
            out.flush()
            line = raw.decode("utf-8", errors="replace").rstrip()
            match = _ERROR_LINE.match(line)
            if match:
                jvm_log.error("spark: %s", line[match.end():])


def set_task_threads() -> None:
    """Call at the top of a Python task: pin native thread pools to one thread."""
    for key, value in THREAD_ENV.items():
        os.environ[key] = value
