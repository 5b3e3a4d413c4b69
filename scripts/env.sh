# Environment shared by `make demo`, `make test` and the README's UI commands.
# Source it from the repository root: `. scripts/env.sh`.
export SHOPML_HOME="${SHOPML_HOME:-$PWD/var}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$SHOPML_HOME/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# The demo's DAG runs when triggered, never nightly (SHOPML_SCHEDULE=@daily turns that on).
export SHOPML_SCHEDULE="${SHOPML_SCHEDULE:-none}"
export MLFLOW_DISABLE_TELEMETRY=true
export GX_ANALYTICS_ENABLED=false
export SPARK_LOCAL_IP=127.0.0.1
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
