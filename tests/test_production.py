"""The nightly DAG on the production profile, against this machine's PostgreSQL and Redis.

Airflow's metadata (LocalExecutor), MLflow's tracking store and registry and Feast's SQL
registry live in fresh PostgreSQL databases ``shopml_test_<random>_{airflow,mlflow,feast}``;
Feast's online store is Redis (project ``shopml_test_<random>``, the suffix of each of its
keys); the offline store and MLflow's artifacts are files. Only the environment differs from
the embedded run of tests/test_e2e.py. Every backend is then read back with its own client.
The servers are required: when one is down, scripts/services.sh tries to start it and the
tests fail (never skip) if it stays down.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from shopml import schema as S
from tests.conftest import REPO, airflow_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DS = "2025-12-31"
# 3 epochs lose to popularity (no champion); ~1.5 s an epoch, as tests/test_e2e.py
CONF = {"max_users": 100, "epochs": 20, "workers": 2, "precompute_k": 5, "served_study_trials": 3}
PG_HOST = os.environ.get("PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PGPORT", "5432"))
PG_USER = os.environ.get("PGUSER", "postgres")
REDIS_HOST = os.environ.get("REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("SHOPML_TEST_REDIS_DB", "15"))  # not the default db 0
SERVICES = REPO / "scripts" / "services.sh"


@dataclass(frozen=True)
class Production:
    prefix: str  # database name prefix and Feast project
    home: Path
    env: dict[str, str]  # the profile: what an operator exports
    log: str

    def database(self, name: str) -> str:
        return f"{self.prefix}_{name}"


def _pg(database: str = "postgres"):
    import psycopg2

    return psycopg2.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=database, connect_timeout=5
    )


def _query(database: str, sql: str, *args: object) -> list[tuple]:
    conn = _pg(database)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def _redis():
    import redis

    return redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_DB, socket_timeout=5)


def _unreachable() -> list[str]:
    down = []
    try:
        _pg().close()
    except Exception as exc:
        down.append(f"PostgreSQL {PG_USER}@{PG_HOST}:{PG_PORT} ({exc})")
    try:
        _redis().ping()
    except Exception as exc:
        down.append(f"Redis {REDIS_HOST}:{REDIS_PORT} ({exc})")
    return down


def _services(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REDIS_DB": str(REDIS_DB)}
    return subprocess.run(
        ["bash", str(SERVICES), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _profile_env(prefix: str, home: Path) -> dict[str, str]:
    """The production profile on this machine (same variables as scripts/prod_demo.sh)."""
    pg = f"{PG_USER}@{PG_HOST}:{PG_PORT}"
    return {
        "SHOPML_HOME": str(home),
        "SHOPML_PROFILE": "production",
        "SHOPML_MLFLOW_TRACKING_URI": f"postgresql://{pg}/{prefix}_mlflow",
        "SHOPML_MLFLOW_ARTIFACT_ROOT": (home / "mlflow-artifacts").as_uri(),
        "SHOPML_FEAST__REGISTRY": f"postgresql+psycopg2://{pg}/{prefix}_feast",
        "SHOPML_FEAST__REDIS_CONNECTION": f"{REDIS_HOST}:{REDIS_PORT},db={REDIS_DB}",
        "SHOPML_FEAST__PROJECT": prefix,
        # Feast's file offline store, not the production default (Spark): a Spark store's JVM
        # in each of the DAG's feature-reading tasks costs ~50 s of the suite's budget, and
        # tests/test_feast.py checks the Spark store's joins against the same oracle.
        "SHOPML_FEAST__OFFLINE_STORE": "file",
        "SHOPML_PRIVACY__KEY": secrets.token_hex(32),  # as from the chart's Secret
        "SHOPML_SPARK__MASTER": "local[2]",
        # Spark stages go through spark-submit (SparkSubmitOperator) on this connection
        "SHOPML_SPARK__SUBMIT": "true",
        "AIRFLOW_CONN_SPARK_DEFAULT": '{"conn_type": "spark", "host": "local[2]"}',
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg}/{prefix}_airflow",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": f"postgresql+psycopg://{pg}/{prefix}_airflow",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }


def _airflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return airflow_cli(env, *args, timeout=900)


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    down = _unreachable()
    if down:
        started = _services("check")
        down = _unreachable()
        if down:
            pytest.fail(
                "the production profile needs PostgreSQL and Redis; not reachable: "
                + "; ".join(down)
                + f"\nscripts/services.sh check said:\n{started.stdout}{started.stderr}",
                pytrace=False,
            )
    prefix = f"shopml_test_{secrets.token_hex(4)}"
    home = tmp_path_factory.mktemp("shopml-production")
    created = _services("create", prefix)
    assert created.returncode == 0, created.stdout + created.stderr
    env = _profile_env(prefix, home)
    try:
        migrate = _airflow(env, "db", "migrate")
        assert migrate.returncode == 0, (migrate.stdout + migrate.stderr)[-4000:]
        proc = _airflow(env, "dags", "test", "nightly_retrain", DS, "-c", json.dumps(CONF))
        log = proc.stdout + proc.stderr
        finished = [line for line in log.splitlines() if "DagRun Finished" in line]
        assert finished and "state=success" in finished[-1], log[-8000:]
        yield Production(prefix, home, env, log)
    finally:
        dropped = _services("drop", prefix)
        assert dropped.returncode == 0, dropped.stdout + dropped.stderr


@pytest.fixture
def prod_settings(production):
    """Settings of the run, built from the profile's environment in this process.

    The environment is restored afterwards as a whole: open_store and MLflow export variables
    (SHOPML_FEAST_*, MLFLOW_TRACKING_URI) that later tests must not inherit.
    """
    from shopml.config import Profile, load_settings

    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith("SHOPML_"):
            del os.environ[key]
    os.environ.update({k: v for k, v in production.env.items() if k.startswith("SHOPML_")})
    try:
        settings = load_settings()
        assert settings.profile is Profile.PRODUCTION
        yield settings
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _known_user(settings, n: int = 0) -> str:
    """The pseudonym of a user the run trained on and tested (the state holds no raw id)."""
    users = pd.read_parquet(settings.paths.run(DS) / "test_users.parquet")[S.USER_ID]
    return str(users.iloc[n])


def _raw_id(settings, pseudonym: str) -> str:
    """The Instacart id behind a pseudonym: what a client sends (serving hashes it)."""
    from shopml.privacy import Pseudonymizer
    from spark_jobs.ingest import instacart_csv_path

    hashed = Pseudonymizer.of(settings)
    ids = pd.read_csv(instacart_csv_path(), usecols=["user_id"])["user_id"].unique()
    (raw,) = [str(u) for u in ids if hashed(str(u)) == pseudonym]
    return raw


def _redis_key(project: str, user_id: str) -> bytes:
    """The key Feast's Redis store writes for a user: serialized entity key + project."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    key = EntityKey(join_keys=[S.USER_ID], entity_values=[Value(string_val=user_id)])
    return _redis_key(project, key, entity_key_serialization_version=3)


def test_airflow_ran_the_dag_on_postgres(production):
    db = production.database("airflow")
    runs = _query(db, "select state from dag_run where dag_id = %s", "nightly_retrain")
    assert runs == [("success",)]
    tasks = dict(
        _query(db, "select task_id, state from task_instance where dag_id = %s", "nightly_retrain")
    )
    assert {"land", "feast_sync", "train", "promote", "batch_score"} <= set(tasks)
    assert set(tasks.values()) == {"success"}, tasks
    operators = dict(
        _query(db, "select task_id, operator from task_instance where dag_id = %s",
               "nightly_retrain")
    )  # fmt: skip
    # the Spark stages were spark-submit jobs of spark_jobs/jobs.py, the rest Python tasks
    assert {operators[t] for t in ("land", "clean", "build_features")} == {"SparkSubmitOperator"}
    # nothing fell back to Airflow's SQLite default
    assert not (production.home / "airflow" / "airflow.db").exists()


def test_mlflow_registry_on_postgres_with_file_artifacts(production, prod_settings):
    from mlflow import MlflowClient

    from training import registry

    uri = production.env["SHOPML_MLFLOW_TRACKING_URI"]
    root = production.env["SHOPML_MLFLOW_ARTIFACT_ROOT"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = prod_settings.model_name
    versions = client.search_model_versions(f"name = '{name}'")
    assert versions, "no registered model version"
    promotion = prod_settings.paths.run(DS) / "promotion.json"
    decision = promotion.read_text() if promotion.exists() else "(no promotion.json)"
    assert registry.champion_version(prod_settings), f"not promoted: {decision}"
    champion = client.get_model_version_by_alias(name, registry.CHAMPION)
    assert str(champion.version) in {str(v.version) for v in versions}
    assert registry.champion_version(prod_settings) == str(champion.version)
    experiment = client.get_experiment_by_name(registry.EXPERIMENT)
    assert experiment.artifact_location == root
    run = client.get_run(champion.run_id)
    assert run.info.artifact_uri.startswith(root)
    assert any(Path(root.removeprefix("file://")).rglob("MLmodel")), "no model files in the root"
    # the same registry, read straight from PostgreSQL
    db = production.database("mlflow")
    assert _query(db, "select name from registered_models") == [(name,)]
    aliases = _query(
        db, "select alias, version from registered_model_aliases where name = %s", name
    )
    assert aliases == [(registry.CHAMPION, int(champion.version))]
    experiments = "select artifact_location from experiments where name = %s"
    assert _query(db, experiments, registry.EXPERIMENT) == [(root,)]
    assert not (production.home / "mlflow" / "mlflow.db").exists()


def test_feast_online_features_in_redis_and_registry_in_postgres(production, prod_settings):
    from shopml.feast_store import open_store

    project = production.prefix
    client = _redis()
    keys = list(client.scan_iter(match=b"*" + project.encode(), count=1000))
    users = pd.read_parquet(prod_settings.paths.features / f"ds={DS}" / "user")[S.USER_ID]
    assert len(keys) >= users.nunique() > 0
    user = _known_user(prod_settings)
    stored = client.hgetall(_redis_key(project, user))
    assert b"_ts:user_features" in stored, sorted(stored)
    # the same value through Feast
    store = open_store(prod_settings)
    assert store.config.online_store.type == "redis"
    assert store.config.registry.registry_type == "sql"
    row = store.get_online_features(
        features=store.get_feature_service("recommender_serving"), entity_rows=[{"user_id": user}]
    ).to_dict()
    assert row["user_n_purchases"][0] is not None and row["user_n_purchases"][0] > 0
    # the registry, read straight from PostgreSQL; no embedded files
    views = _query(
        production.database("feast"),
        "select feature_view_name from feature_views where project_id = %s",
        project,
    )
    assert {v for (v,) in views} == {
        "user_features", "item_features", "user_recommendations", "session_features"}  # fmt: skip
    assert not (production.home / "feast" / "online.db").exists()
    assert not (production.home / "feast" / "registry.db").exists()


def test_serving_reads_the_champion_and_redis_features(production, prod_settings):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from training import registry

    user = _known_user(prod_settings)
    raw = _raw_id(prod_settings, user)
    champion = registry.champion_version(prod_settings)
    with TestClient(create_app(prod_settings)) as client:
        ready = client.get("/readyz").json()
        assert {k: ready[k] for k in ("status", "model_version", "arms")} == {
            "status": "ready",
            "model_version": champion,
            "arms": {"champion": champion},
        }
        assert ready["models"]["champion.ranker"]["version"] == champion
        known = client.get(f"/recommendations/{raw}", params={"k": 5}).json()
        assert known["fallback"] is False and len(known["items"]) == 5
        assert known["model_version"] == champion
        # without its Redis hash the same user falls back: the features came from Redis
        similar = client.get(f"/items/{known['items'][0]['item_id']}/similar").json()
        assert similar["model_version"] == champion and len(similar["items"]) == 10
        assert _redis().delete(_redis_key(production.prefix, user)) == 1
        gone = client.get(f"/recommendations/{raw}", params={"k": 5}).json()
        assert gone["fallback"] is True and len(gone["items"]) == 5
        assert gone["fallback_reason"] == "no_online_features"


def test_events_go_to_a_redis_stream_and_a_pushed_session_in_redis_shapes_the_answer(
    production, prod_settings
):
    """The production profile's real-time path on the real servers: POST /events appends one
    entry to a Redis Stream (the run's own key), and a session pushed into Feast's Redis
    online store takes its items out of the user's next answer."""
    from fastapi.testclient import TestClient
    from feast.data_source import PushMode
    from pydantic import SecretStr

    from serving.app import create_app
    from shopml.feast_store import open_store

    key = f"{production.prefix}:events"
    events = prod_settings.events.model_copy(
        update={"stream_name": key, "token": SecretStr(secrets.token_hex(32))}
    )
    settings = prod_settings.model_copy(update={"events": events})
    assert settings.events.backend == "redis"
    user = _known_user(prod_settings, 1)
    raw = _raw_id(prod_settings, user)
    auth = {"Authorization": f"Bearer {events.token.get_secret_value()}"}
    try:
        with TestClient(create_app(settings)) as client:
            before = [
                i["item_id"]
                for i in client.get(f"/recommendations/{raw}", params={"k": 10}).json()["items"]
            ]
            event = {
                "user_id": raw,
                "item_id": before[0],
                "event_type": "cart",
                "timestamp": pd.Timestamp.now(tz="UTC").isoformat(),
            }
            r = client.post("/events", json={"events": [event]}, headers=auth)
            assert r.status_code == 202, r.text
            assert _redis().xlen(key) == 1
            ((_, fields),) = _redis().xrange(key)
            assert json.loads(fields[b"events"])[0][S.USER_ID] == user  # the pseudonym
            at = pd.Timestamp.now(tz="UTC")
            open_store(settings).push(
                "session_push",
                pd.DataFrame(
                    {
                        S.USER_ID: [user],
                        S.SESSION_ID: ["s"],
                        S.SESSION_ITEMS: [[before[0]]],
                        S.SESSION_LENGTH: [1],
                        S.SESSION_LAST_CATEGORY: [None],
                        S.SESSION_LAST_EVENT_MS: [int(at.timestamp() * 1000)],
                        S.ENTITY_TIMESTAMP: [at],
                    }
                ),
                to=PushMode.ONLINE,
            )
            after = client.get(f"/recommendations/{raw}", params={"k": 10}).json()
            assert after["fallback"] is False
            assert before[0] not in [i["item_id"] for i in after["items"]]
    finally:
        _redis().delete(key)  # fmt: skip


def test_batch_scoring_writes_the_top_k_into_redis(production, prod_settings):
    from datetime import date

    from serving.batch import batch_score
    from shopml.feast_store import open_store

    summary = batch_score(prod_settings, date.fromisoformat(DS), k=5, to_online=True)
    assert summary["online_rows"] == summary["users"] > 0
    user = _known_user(prod_settings)
    stored = _redis().hgetall(_redis_key(production.prefix, user))
    assert b"_ts:user_recommendations" in stored, sorted(stored)
    row = (
        open_store(prod_settings)
        .get_online_features(
            features=["user_recommendations:recommended_items"], entity_rows=[{"user_id": user}]
        )
        .to_dict()
    )
    top = pd.read_parquet(prod_settings.paths.recommendations / f"ds={DS}")
    expected = top[top[S.USER_ID] == user].sort_values("rank")[S.ITEM_ID].tolist()
    assert row["recommended_items"][0] == expected and len(expected) == 5
    # a rerun of the date replaces the lists in Redis (Feast keeps only newer rows there)
    batch_score(prod_settings, date.fromisoformat(DS), k=3, to_online=True)
    row = (
        open_store(prod_settings)
        .get_online_features(
            features=["user_recommendations:recommended_items"], entity_rows=[{"user_id": user}]
        )
        .to_dict()
    )
    assert row["recommended_items"][0] == expected[:3]


def test_forget_deletes_the_users_redis_rows_and_batch_scoring_skips_them(
    production, prod_settings
):
    """``shopml forget`` against Redis: the user's hash (features and precomputed list) goes,
    and batch scoring, which still serves the trained champion, writes no list for them."""
    from datetime import date

    from serving.batch import batch_score
    from shopml.privacy import forget

    user = _known_user(prod_settings, 1)
    assert _redis().exists(_redis_key(production.prefix, user))
    done = forget(prod_settings, _raw_id(prod_settings, user))
    assert done.user == user and done.online_rows_removed == 1 and done.rows_removed > 0
    assert not _redis().exists(_redis_key(production.prefix, user))
    summary = batch_score(prod_settings, date.fromisoformat(DS), k=3, to_online=True)
    assert summary["forgotten_skipped"] == 1
    assert not _redis().exists(_redis_key(production.prefix, user))
    top = pd.read_parquet(prod_settings.paths.recommendations / f"ds={DS}")
    assert user not in set(top[S.USER_ID]) and _known_user(prod_settings) in set(top[S.USER_ID])


def test_the_services_redis_client_gives_up_at_once(prod_settings):
    """The service's Feast client does not retry (redis-py's default: three times, backing
    off from 1 s) and waits serving.online_timeout_ms at most; an unreachable Redis is a
    FeaturesUnavailable (the fallback), not a hung request. benchmarks/chaos.py shows the
    effect under load, with Redis stopped for 20 s."""
    import socket

    from served_model.features import FeaturesUnavailable
    from serving.models import online_features
    from shopml.feast_store import redis_client

    client = redis_client(online_features(prod_settings).store)
    assert client.get_retry()._retries == 0
    timeout = prod_settings.serving.online_timeout_ms / 1000
    assert client.connection_pool.connection_kwargs["socket_timeout"] == timeout
    assert client.connection_pool.connection_kwargs["socket_connect_timeout"] == timeout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens once this closes
    feast = prod_settings.feast.model_copy(update={"redis_connection": f"127.0.0.1:{dead}"})
    gone = online_features(prod_settings.model_copy(update={"feast": feast}))
    with pytest.raises(FeaturesUnavailable, match="ConnectionError"):
        gone.users([_known_user(prod_settings)])
