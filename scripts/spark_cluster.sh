#!/usr/bin/env bash
# A real Spark standalone cluster on this machine, from the installed pyspark (its
# bin/spark-class runs the master and the workers): the production profile's engine, for
# running the same jobs on a cluster (SHOPML_SPARK__MASTER=spark://127.0.0.1:7077, or
# spark-submit --master spark://127.0.0.1:7077 spark_jobs/jobs.py ...).
#
# Usage:
#   scripts/spark_cluster.sh start [WORKERS] [CORES] [MEMORY]   default 2 workers, 1 core and
#                                                                2g each
#   scripts/spark_cluster.sh status                              the master's view (JSON)
#   scripts/spark_cluster.sh stop
#
# State and logs: $SHOPML_HOME/spark-cluster (default var/). The master listens on
# 127.0.0.1:7077 (SPARK_MASTER_PORT), its UI on 8088 (SPARK_MASTER_WEBUI_PORT). Executors run
# this repository's .venv Python, so they import the same code as the driver.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="$REPO/.venv/bin/python"
SPARK_HOME="$("$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
STATE="${SHOPML_HOME:-$REPO/var}/spark-cluster"
HOST=127.0.0.1
PORT="${SPARK_MASTER_PORT:-7077}"
UI="${SPARK_MASTER_WEBUI_PORT:-8088}"
export SPARK_HOME SPARK_LOCAL_IP="$HOST" PYSPARK_PYTHON="$PYTHON" PYSPARK_DRIVER_PYTHON="$PYTHON"
export SPARK_LOG_DIR="$STATE/logs" SPARK_WORKER_DIR="$STATE/work"

die() {
  echo "spark_cluster.sh: $*" >&2
  exit 1
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

status() { "$PYTHON" - "$UI" <<'EOF'
import json, sys, urllib.request
state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/json/", timeout=5))
alive = [w for w in state["workers"] if w["state"] == "ALIVE"]
print(json.dumps({"url": state["url"], "status": state["status"], "alive_workers": len(alive),
                  "cores": sum(w["cores"] for w in alive),
                  "memory_mb": sum(w["memory"] for w in alive)}))
EOF
}

start() {
  local workers="${1:-2}" cores="${2:-1}" memory="${3:-2g}"
  mkdir -p "$STATE" "$SPARK_LOG_DIR" "$SPARK_WORKER_DIR"
  alive "$STATE/master.pid" && die "already running (scripts/spark_cluster.sh stop first)"
  nohup "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master \
    --host "$HOST" --port "$PORT" --webui-port "$UI" >"$STATE/master.log" 2>&1 &
  echo $! >"$STATE/master.pid"
  for _ in $(seq 60); do
    status >/dev/null 2>&1 && break
    sleep 1
  done
  status >/dev/null 2>&1 || die "the master did not start: see $STATE/master.log"
  for i in $(seq "$workers"); do
    nohup "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker \
      --host "$HOST" --cores "$cores" --memory "$memory" --webui-port 0 \
      --work-dir "$SPARK_WORKER_DIR/$i" "spark://$HOST:$PORT" >"$STATE/worker-$i.log" 2>&1 &
    echo $! >"$STATE/worker-$i.pid"
  done
  for _ in $(seq 60); do
    [[ "$(status | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["alive_workers"])')" == "$workers" ]] && break
    sleep 1
  done
  status
}

stop() {
  for pid in "$STATE"/worker-*.pid "$STATE/master.pid"; do
    [[ -f "$pid" ]] || continue
    alive "$pid" && kill "$(cat "$pid")"
    rm -f "$pid"
  done
  echo "spark_cluster.sh: stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  status) status ;;
  stop) stop ;;
  *) die "usage: $0 start [WORKERS] [CORES] [MEMORY] | status | stop" ;;
esac
