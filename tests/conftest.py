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
PIPELINE_CONF = {"max_users": 100, "epochs": 20, "workers": 2, "precompute_k": 5}


@pytest.fixture(scope="session")
def airflow_pipeline(tmp_path_factory):
    """(home, the running Airflow, the run's result) after one successful DAG run."""
    from cli.airflow_run import Airflow

    home = tmp_path_factory.mktemp("shopml")
    env = clean_env({"SHOPML_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow")})
    airflow = Airflow(env).start()
    try:
        result = airflow.run(PIPELINE_DS, PIPELINE_CONF, timeout=1500)
        assert result.state == "success", result.table() + "\n" + airflow.failures(result)
        yield home, airflow, result
    finally:
        airflow.stop()
