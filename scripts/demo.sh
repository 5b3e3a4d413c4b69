#!/usr/bin/env bash
# The nightly pipeline on the embedded profile, on the real Instacart sample, through Airflow:
# a real scheduler, API server and DAG processor (cli/airflow_run.py), so the Airflow UI
# (`make airflow-ui`) shows the run's true start, duration and every task's log.
# Usage: scripts/demo.sh [LOGICAL_DATE] [CONF_JSON]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
DS="${1:-2025-12-31}"   # the Instacart timeline (anchored at 2025-01-01) ends on 2025-12-30
CONF="${2:-}"
[[ -n "$CONF" ]] || CONF="{}"
mkdir -p "$AIRFLOW_HOME"
# A rerun of the same date replaces its earlier Airflow run; outputs are overwritten per ds.
python -m cli.airflow_run --ds "$DS" --conf "$CONF" | tee "$SHOPML_HOME/demo-$DS.log" || {
  echo "demo: DAG run failed: the failed task's log is under $AIRFLOW_HOME/logs/dag_id=nightly_retrain/"
  exit 1
}
echo "demo: done. Evaluation: $SHOPML_HOME/runs/ds=$DS/evaluation.json; serve with 'make serve'"
echo "demo: look at it with 'make airflow-ui', 'make mlflow-ui' and $SHOPML_HOME/gx/gx/uncommitted/data_docs/local_site/index.html"
