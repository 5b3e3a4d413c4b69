#!/usr/bin/env bash
# The nightly pipeline on the embedded profile, on the real Instacart sample, through Airflow.
# Usage: scripts/demo.sh [LOGICAL_DATE] [CONF_JSON]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
DS="${1:-2025-12-31}"   # the Instacart timeline (anchored at 2025-01-01) ends on 2025-12-30
CONF="${2:-}"
[[ -n "$CONF" ]] || CONF="{}"
mkdir -p "$AIRFLOW_HOME"
airflow db migrate >/dev/null
# A rerun of the same date replaces the earlier Airflow run; outputs are overwritten per ds.
airflow dags delete -y nightly_retrain >/dev/null 2>&1 || true
airflow dags test nightly_retrain "$DS" -c "$CONF" | tee "$SHOPML_HOME/demo-$DS.log" \
  | grep -E "^\s*(model|popularity|personal_top_frequency|two_tower|two_tower_int8|two_stage|champion_v[0-9a-z_]+|[a-z_]+_knn|ease|als|sasrec|hybrid|content_tfidf|recent_popularity) |model version|DagRun Finished" || true
grep -q "state=success" "$SHOPML_HOME/demo-$DS.log" || { echo "demo: DAG run failed, see $SHOPML_HOME/demo-$DS.log"; exit 1; }
echo "demo: done. Evaluation: $SHOPML_HOME/runs/ds=$DS/evaluation.json; serve with 'make serve'"
