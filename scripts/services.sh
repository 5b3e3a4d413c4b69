#!/usr/bin/env bash
# The production profile's servers on this machine: PostgreSQL (Airflow metadata, MLflow
# tracking/registry, Feast SQL registry) and Redis (Feast online store).
#
# Usage:
#   scripts/services.sh check            reachable? if not, try to start them (local hosts only);
#                                        exits 1 with a message naming what is down
#   scripts/services.sh create PREFIX    databases PREFIX_airflow, PREFIX_mlflow, PREFIX_feast
#                                        (those that do not exist yet)
#   scripts/services.sh drop PREFIX      drop those databases and delete the Redis keys of the
#                                        Feast project PREFIX (Feast suffixes each key with it)
#
# Connection: PGHOST, PGPORT, PGUSER (libpq; default 127.0.0.1:5432, postgres, trust or
# PGPASSWORD), REDIS_HOST, REDIS_PORT, REDIS_DB (default 127.0.0.1:6379, db 0).
set -euo pipefail

export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_DB="${REDIS_DB:-0}"
DATABASES=(airflow mlflow feast)
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="$REPO/.venv/bin/python"
[[ -x "$PYTHON" ]] || PYTHON=python3

die() {
  echo "services.sh: $*" >&2
  exit 1
}

postgres_up() {
  if command -v pg_isready >/dev/null; then
    pg_isready -q -t 3
  else
    psql -d postgres -Atqc "select 1" >/dev/null 2>&1
  fi
}

redis_up() {
  if command -v redis-cli >/dev/null; then
    [[ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
  else
    "$PYTHON" -c "import redis,sys; redis.Redis('$REDIS_HOST', $REDIS_PORT,
socket_timeout=3).ping() or sys.exit(1)" >/dev/null 2>&1
  fi
}

is_local() {
  [[ "$1" == 127.0.0.1 || "$1" == localhost || "$1" == ::1 ]]
}

wait_for() {  # wait_for CHECK: up to 20 s
  for _ in $(seq 20); do
    "$1" && return 0
    sleep 1
  done
  return 1
}

start_postgres() {
  is_local "$PGHOST" || return 1
  echo "services.sh: PostgreSQL on $PGHOST:$PGPORT is not answering; trying to start it" >&2
  if ! service postgresql start >/dev/null 2>&1 && command -v pg_lsclusters >/dev/null; then
    # Debian clusters without an init script: start the first one.
    pg_lsclusters -h | awk 'NR == 1 {print $1, $2}' | {
      read -r version name && pg_ctlcluster "$version" "$name" start
    } >/dev/null 2>&1 || true
  fi
  wait_for postgres_up
}

start_redis() {
  is_local "$REDIS_HOST" || return 1
  echo "services.sh: Redis on $REDIS_HOST:$REDIS_PORT is not answering; trying to start it" >&2
  if ! service redis-server start >/dev/null 2>&1 && command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" >/dev/null 2>&1 || true
  fi
  wait_for redis_up
}

check() {
  local down=()
  postgres_up || start_postgres || down+=("PostgreSQL at $PGHOST:$PGPORT (user $PGUSER)")
  redis_up || start_redis || down+=("Redis at $REDIS_HOST:$REDIS_PORT")
  if ((${#down[@]})); then
    printf 'services.sh: not reachable and could not be started: %s\n' "${down[@]}" >&2
    echo "services.sh: start them (e.g. 'service postgresql start', 'redis-server --daemonize" \
      "yes') or point PGHOST/PGPORT/PGUSER and REDIS_HOST/REDIS_PORT at running servers" >&2
    exit 1
  fi
  echo "services.sh: PostgreSQL $PGHOST:$PGPORT and Redis $REDIS_HOST:$REDIS_PORT are up"
}

valid_prefix() {
  [[ "${1:-}" =~ ^[a-z][a-z0-9_]{0,40}$ ]] || die "PREFIX must match [a-z][a-z0-9_]* (got '${1:-}')"
}

create() {
  valid_prefix "${1:-}"
  local db
  for db in "${DATABASES[@]/#/$1_}"; do
    if [[ -z "$(psql -d postgres -Atqc "select 1 from pg_database where datname = '$db'")" ]]; then
      createdb "$db"
      echo "services.sh: created database $db"
    fi
  done
}

drop() {
  valid_prefix "${1:-}"
  local db
  for db in "${DATABASES[@]/#/$1_}"; do
    dropdb --if-exists --force "$db"
  done
  # Feast's Redis keys are <serialized entity key><project>: binary, so delete them with a
  # client rather than through redis-cli's text output.
  "$PYTHON" - "$1" <<EOF
import sys

import redis

client = redis.Redis("$REDIS_HOST", $REDIS_PORT, db=$REDIS_DB)
keys = list(client.scan_iter(match=b"*" + sys.argv[1].encode(), count=1000))
for i in range(0, len(keys), 1000):
    client.delete(*keys[i : i + 1000])
print(f"services.sh: dropped databases {sys.argv[1]}_*, deleted {len(keys)} Redis keys")
EOF
}

case "${1:-check}" in
  check) check ;;
  create) check >/dev/null && create "${2:-}" ;;
  drop) drop "${2:-}" ;;
  *) die "usage: $0 {check|create PREFIX|drop PREFIX}" ;;
esac
