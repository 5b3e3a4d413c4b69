#!/usr/bin/env bash
# The nightly DAG on the production profile, against this machine's PostgreSQL and Redis:
# Airflow metadata (LocalExecutor), MLflow tracking + registry and the Feast SQL registry in
# PostgreSQL databases <PREFIX>_airflow/_mlflow/_feast, the Feast online store in Redis
# (project <PREFIX>), MLflow artifacts and the Parquet lake under SHOPML_PROD_HOME.
# The same code as the embedded demo: only the environment below differs.
#
# Usage:
#   scripts/prod_demo.sh [LOGICAL_DATE] [CONF_JSON]   run (databases are created if missing and
#                                                     kept: reruns add registry versions)
#   scripts/prod_demo.sh --env                        print the exports, e.g. to serve it:
#       eval "$(scripts/prod_demo.sh --env)" && shopml serve
#   scripts/prod_demo.sh --clean                      drop the databases, the Redis keys of the
#                                                     project and SHOPML_PROD_HOME
# Settings: SHOPML_PROD_PREFIX (shopml_demo), SHOPML_PROD_HOME (var/prod), PGHOST/PGPORT/PGUSER
# (127.0.0.1:5432, postgres), REDIS_HOST/REDIS_PORT/REDIS_DB (127.0.0.1:6379, 0).
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX="${SHOPML_PROD_PREFIX:-shopml_demo}"
PROD_HOME="${SHOPML_PROD_HOME:-$PWD/var/prod}"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
export REDIS_HOST="${REDIS_HOST:-127.0.0.1}" REDIS_PORT="${REDIS_PORT:-6379}" REDIS_DB="${REDIS_DB:-0}"
PG="$PGUSER@$PGHOST:$PGPORT"

profile_env() {
  cat <<EOF
export SHOPML_HOME='$PROD_HOME'
export AIRFLOW_HOME='$PROD_HOME/airflow'
export SHOPML_PROFILE=production
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN='postgresql+psycopg2://$PG/${PREFIX}_airflow'
# Airflow 3 also opens an async engine; psycopg 3 serves it (asyncpg is not installed).
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC='postgresql+psycopg://$PG/${PREFIX}_airflow'
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export SHOPML_MLFLOW_TRACKING_URI='postgresql://$PG/${PREFIX}_mlflow'
export SHOPML_MLFLOW_ARTIFACT_ROOT='file://$PROD_HOME/mlflow-artifacts'
export SHOPML_FEAST__REGISTRY='postgresql+psycopg2://$PG/${PREFIX}_feast'
export SHOPML_FEAST__REDIS_CONNECTION='$REDIS_HOST:$REDIS_PORT,db=$REDIS_DB'
export SHOPML_FEAST__PROJECT='$PREFIX'
# the user-id key (shopml/privacy.py): a mounted Secret in Kubernetes, a local file here
export SHOPML_PRIVACY__KEY_FILE='$PROD_HOME/secrets/user-id.key'
export SHOPML_SPARK__MASTER='${SHOPML_SPARK__MASTER:-local[2]}'
# Spark stages run as spark-submit (SparkSubmitOperator) on Airflow's spark_default connection
export SHOPML_SPARK__SUBMIT=true
export AIRFLOW_CONN_SPARK_DEFAULT='{"conn_type": "spark", "host": "${SHOPML_SPARK__MASTER:-local[2]}"}'
EOF
}

# The production profile never generates its key (each pod would make its own): made here,
# once, as an operator would create the Secret.
ensure_key() {
  local key="$PROD_HOME/secrets/user-id.key"
  [[ -s "$key" ]] && return
  mkdir -p "$(dirname "$key")"
  (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' > "$key")
}

case "${1:-}" in
  --env)
    ensure_key
    profile_env
    echo ". scripts/env.sh"
    exit 0
    ;;
  --clean)
    scripts/services.sh drop "$PREFIX"
    rm -rf "$PROD_HOME"
    echo "prod_demo: removed $PROD_HOME"
    exit 0
    ;;
esac

DS="${1:-2025-12-31}"
CONF="${2:-}"
[[ -n "$CONF" ]] || CONF='{"max_users": 100, "epochs": 20, "workers": 2}'
eval "$(profile_env)"
. scripts/env.sh
ensure_key

scripts/services.sh create "$PREFIX"
mkdir -p "$AIRFLOW_HOME"
start=$SECONDS
# A real scheduler run (cli/airflow_run.py, as `make demo`); a rerun of a date replaces its run.
LOG="$SHOPML_HOME/prod-demo-$DS.log"
python -m cli.airflow_run --ds "$DS" --conf "$CONF" >"$LOG" 2>&1 || true
grep -E "^\s*(model|popularity|personal_top|two_tower|champion)|model version|DagRun " \
  "$LOG" || true
echo "prod_demo: $((SECONDS - start)) s; where the run left its state:"
psql -d "${PREFIX}_airflow" -Atc "select 'airflow dag_run: ' || run_id || ' ' || state
  from dag_run where dag_id = 'nightly_retrain' order by id desc limit 1"
psql -d "${PREFIX}_mlflow" -Atc "select 'mlflow registry: ' || v.name || ', '
  || count(*) || ' versions, champion v' || coalesce(max(a.version)::text, 'none')
  from model_versions v left join registered_model_aliases a
  on a.name = v.name and a.alias = 'champion' group by v.name"
python - <<'EOF'
import redis

from shopml.config import load_settings
from shopml.feast_store import open_store

s = load_settings()
views = [v.name for v in open_store(s).list_feature_views()]
print(f"feast registry: project {s.feast.project}, views {views}")
address, *options = s.feast.redis_connection.split(",")
host, port = address.rsplit(":", 1)
db = int(dict(o.split("=", 1) for o in options).get("db", 0))
client = redis.Redis(host, int(port), db=db)
keys = sum(1 for _ in client.scan_iter(match=b"*" + s.feast.project.encode(), count=1000))
print(f"feast online: {keys} entity keys in redis {s.feast.redis_connection}")
EOF
if ! grep -q "^DagRun .*: state=success" "$LOG"; then
  echo "prod_demo: DAG run failed, see $LOG"
  exit 1
fi
echo "prod_demo: done. Log: $LOG. Serve: eval \"\$(scripts/prod_demo.sh --env)\" && shopml serve"
echo "prod_demo: clean up with scripts/prod_demo.sh --clean"
