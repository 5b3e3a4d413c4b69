"""Shared fixtures: one local Spark session per test run, isolated ShopML homes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # MiniLM comes from an installed package

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Embedded-profile settings rooted in a fresh temporary SHOPML_HOME."""
    from shopml.config import load_settings

    monkeypatch.setenv("SHOPML_HOME", str(tmp_path / "home"))
    return load_settings()


@pytest.fixture(scope="session")
def spark():
    from shopml.config import SparkConfig
    from spark_jobs.session import get_spark

    session = get_spark(SparkConfig(master="local[2]", shuffle_partitions=2), "shopml-tests")
    yield session
    session.stop()


def clean_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` (ShopML/Airflow variables) on top of a copy of this environment without any
    ShopML or Airflow variable, with this venv first on PATH: as under ``make demo``."""
    import sys

    bin_dir = Path(sys.executable).parent
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SHOPML_", "AIRFLOW"))},
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }


def airflow_cli(env: dict[str, str], *args: str, timeout: int = 1200):
    """Run the ``airflow`` CLI of this venv with ``env`` on a clean environment."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    full_env = clean_env(env)
    return subprocess.run(
        [str(bin_dir / "airflow"), *args],
        env=full_env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


# The whole nightly DAG on a slice of the real Instacart data, run once per test session by a
# real Airflow scheduler (cli/airflow_run.py, as `make demo` does) and shared by the end-to-end
# and browser tests; the Airflow services stay up until the session ends.
PIPELINE_DS = "2025-12-31"
PIPELINE_CONF = {
    "max_users": 100,
    "epochs": 20,
    "workers": 2,
    "precompute_k": 5,
    "served_study_trials": 3,
}
# In every raw user id of the shared run's source (tests/test_e2e.py searches the whole state
# for it: Instacart's own ids, small integers, would match any file and prove nothing).
PLANTED = "Zq9planted"


@pytest.fixture(scope="session")
def planted_source(tmp_path_factory, spark):
    """The Instacart slice of the shared run as a retailer's canonical Parquet export, each
    user id ``Zq9planted-<Instacart id>``: the same rows and timestamps ``land`` derives from
    the bundled sample, only the ids made distinctive."""
    from pyspark.sql import functions as F

    from shopml import schema as S
    from shopml.config import load_settings
    from spark_jobs import ingest

    root = tmp_path_factory.mktemp("export")
    events, items = ingest.read_source(spark, ingest.INSTACART, load_settings().anchor_date)
    events = ingest.keep_first_users(events, PIPELINE_CONF["max_users"])
    events = events.drop(ingest.RAW_TIMESTAMP).withColumn(
        S.USER_ID, F.concat(F.lit(f"{PLANTED}-"), F.col(S.USER_ID))
    )
    events.write.parquet(str(root / "events"))
    items.write.parquet(str(root / "items"))
    return root


@pytest.fixture(scope="session")
def pipeline_conf(planted_source):
    """The shared run's trigger Params (a rerun of its date uses the same)."""
    return {**PIPELINE_CONF, "source": str(planted_source)}


@pytest.fixture(scope="session")
def airflow_pipeline(tmp_path_factory, pipeline_conf):
    """(home, the running Airflow, the run's result) after one successful DAG run."""
    from cli.airflow_run import Airflow

    home = tmp_path_factory.mktemp("shopml")
    env = clean_env({"SHOPML_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow")})
    airflow = Airflow(env).start()
    try:
        result = airflow.run(PIPELINE_DS, pipeline_conf, timeout=1500)
        assert result.state == "success", result.table() + "\n" + airflow.failures(result)
        yield home, airflow, result
    finally:
        airflow.stop()
