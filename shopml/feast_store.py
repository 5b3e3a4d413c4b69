"""Open, apply and materialize ShopML's Feast repository for the configured profile.

`feast apply` and `feast materialize-incremental` run as Feast's own CLI in a subprocess
(exactly what an operator would type); Python code reads through :func:`open_store`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from shopml.config import Profile, Settings, service_environment

if TYPE_CHECKING:
    from feast import FeatureStore

FEATURE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"
# Views loaded from the Spark snapshots by materialize; user_recommendations is written
# directly by the batch scoring job (serving/batch.py).
SNAPSHOT_VIEWS = ("user_features", "item_features")


def store_yaml(settings: Settings) -> Path:
    """The profile's Feast config: SQLite + file registry, or Redis + SQL registry.

    Both read their backends from the environment of :func:`feast_environment`; Settings
    rejects backends that do not belong to the profile.
    """
    if settings.profile is Profile.PRODUCTION:
        return FEATURE_REPO / "feature_store.production.yaml"
    return FEATURE_REPO / "feature_store.yaml"


def feast_environment(settings: Settings, ds: date | None = None) -> dict[str, str]:
    """Environment for Feast: backends from the profile, sources at the ``ds`` snapshot."""
    env = service_environment(settings)
    if ds is not None:
        env["SHOPML_FEATURES_DIR"] = str(settings.paths.features / f"ds={ds.isoformat()}")
    settings.paths.feast.mkdir(parents=True, exist_ok=True)
    return env


def _feast_cli(settings: Settings, ds: date, *args: str) -> str:
    env = {**os.environ, **feast_environment(settings, ds)}
    cmd = [
        str(Path(sys.executable).with_name("feast")),
        "--chdir",
        str(FEATURE_REPO),
        "--feature-store-yaml",
        str(store_yaml(settings)),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`feast {' '.join(args)}` failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def apply(settings: Settings, ds: date) -> str:
    """``feast apply``: register the definitions, sources pointing at the ``ds`` snapshot."""
    return _feast_cli(settings, ds, "apply")


def materialize(settings: Settings, ds: date) -> str:
    """Load the online store with features valid at the end of ``ds``.

    Nightly this is ``feast materialize-incremental`` (from where the last run stopped; an
    upsert, so reruns are safe). On a store never materialized, Feast would start at
    wall-clock ``now - ttl``, which misses everything when ``ds`` is a backfill date, so the
    first run materializes ``[end of ds - ttl, end of ds]`` explicitly instead.
    """
    from spark_jobs.jobs import end_of_day

    end = end_of_day(ds)
    views = [v for v in open_store(settings).list_feature_views() if v.name in SNAPSHOT_VIEWS]
    only = [arg for v in SNAPSHOT_VIEWS for arg in ("--views", v)]
    if all(v.materialization_intervals for v in views):
        return _feast_cli(settings, ds, "materialize-incremental", end.isoformat(), *only)
    start = end - max(v.ttl for v in views)
    return _feast_cli(settings, ds, "materialize", start.isoformat(), end.isoformat(), *only)


def open_store(settings: Settings) -> FeatureStore:
    """A FeatureStore on the registry the last ``apply`` wrote."""
    from feast import FeatureStore

    os.environ.update(feast_environment(settings))
    return FeatureStore(repo_path=str(FEATURE_REPO), fs_yaml_file=store_yaml(settings))
