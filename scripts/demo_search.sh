#!/usr/bin/env bash
# The search pipeline (dags/search_retrain.py) on the embedded profile, on the real Women's
# Clothing reviews, through Airflow (cli/airflow_run.py), then the benchmark tables (quality and
# /search latency; the cross-encoder's compression candidates).
# Usage: scripts/demo_search.sh [LOGICAL_DATE] [CONF_JSON]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
DS="${1:-2025-12-31}"
CONF="${2:-}"
[[ -n "$CONF" ]] || CONF="{}"
mkdir -p "$AIRFLOW_HOME"
python -m cli.airflow_run --dag search_retrain --ds "$DS" --conf "$CONF" \
  --show search_data train_bi_encoder train_cross_encoder evaluate_search compress_search \
  promote_search \
  | tee "$SHOPML_HOME/demo-search-$DS.log" || {
  echo "demo-search: DAG run failed: the failed task's log is under $AIRFLOW_HOME/logs/dag_id=search_retrain/"
  exit 1
}
python -m benchmarks.search --ds "$DS" | tee -a "$SHOPML_HOME/demo-search-$DS.log"
python -m benchmarks.compression --ds "$DS" --skip-ranker | tee -a "$SHOPML_HOME/demo-search-$DS.log"
echo "demo-search: done. Serve with 'make serve' (GET /search?q=...), look with 'make mlflow-ui'"
