#!/bin/bash
# Entry point of the deepcontent image: `deepcontent "$@"`, except for the two roles Spark on
# Kubernetes starts its pods in. Spark passes `driver <spark-submit args>` to the driver pod and
# `executor` to executor pods, with the executor's settings in SPARK_* environment variables.
set -euo pipefail

case "${1:-}" in
  driver)
    shift
    # The driver pod runs spark-submit in client mode: the driver is this pod.
    exec "$SPARK_HOME/bin/spark-submit" --deploy-mode client \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" "$@"
    ;;
  executor)
    shift
    # Extra JVM options arrive numbered (SPARK_JAVA_OPT_0, _1, ...) and must keep that order.
    mapfile -t java_opts < <(env | grep '^SPARK_JAVA_OPT_' | sort -t_ -k4 -n | cut -d= -f2-)
    exec "$JAVA_HOME/bin/java" "${java_opts[@]}" \
      -Xms"$SPARK_EXECUTOR_MEMORY" -Xmx"$SPARK_EXECUTOR_MEMORY" \
      -cp "$SPARK_HOME/conf:$SPARK_HOME/jars/*" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "$SPARK_DRIVER_URL" --executor-id "$SPARK_EXECUTOR_ID" \
      --cores "$SPARK_EXECUTOR_CORES" --app-id "$SPARK_APPLICATION_ID" \
      --hostname "$SPARK_EXECUTOR_POD_IP" --resourceProfileId "$SPARK_RESOURCE_PROFILE_ID" \
      --podName "$SPARK_EXECUTOR_POD_NAME"
    ;;
  *)
    exec deepcontent "$@"
    ;;
esac
