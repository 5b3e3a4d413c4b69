"""Shared fixtures: one local Spark session per test run, isolated ShopML homes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

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


def airflow_cli(env: dict[str, str], *args: str, timeout: int = 1200):
    """Run the ``airflow`` CLI of this venv with ``env`` (ShopML/Airflow variables) on top of a
    clean copy of the environment: the DAG runs the same way as under ``make demo``."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SHOPML_", "AIRFLOW"))},
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    return subprocess.run(
        [str(bin_dir / "airflow"), *args],
        env=full_env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )
