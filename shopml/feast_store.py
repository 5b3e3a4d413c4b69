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

from shopml import schema as S
from shopml.config import Profile, Settings, service_environment
from shopml.paths import end_of_day

if TYPE_CHECKING:
    import pandas as pd
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
        env["SHOPML_FEATURES_DIR"] = str(settings.paths.features_for(ds))
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
    end = end_of_day(ds)
    views = [v for v in open_store(settings).list_feature_views() if v.name in SNAPSHOT_VIEWS]
    only = [arg for v in SNAPSHOT_VIEWS for arg in ("--views", v)]
    if all(v.materialization_intervals for v in views):
        return _feast_cli(settings, ds, "materialize-incremental", end.isoformat(), *only)
    start = end - max(v.ttl for v in views)
    return _feast_cli(settings, ds, "materialize", start.isoformat(), end.isoformat(), *only)


def open_store(settings: Settings) -> FeatureStore:
    """A FeatureStore on the registry the last ``apply`` wrote.

    The profile's YAML is filled from :func:`feast_environment` here, not from ``os.environ``
    (Feast's own loader), so opening a store never changes the process environment.
    """
    from string import Template

    import yaml
    from feast import FeatureStore, RepoConfig

    text = Template(store_yaml(settings).read_text()).substitute(feast_environment(settings))
    config = RepoConfig(**yaml.safe_load(text))
    config.repo_path = FEATURE_REPO
    return FeatureStore(repo_path=str(FEATURE_REPO), config=config)


def point_in_time_features(settings: Settings, entity_df: pd.DataFrame) -> pd.DataFrame:
    """Feast ``get_historical_features`` with the training feature service.

    ``entity_df`` needs ``user_id``, ``item_id`` and ``event_timestamp``; each row gets the
    latest feature snapshot valid at its timestamp (never a later one), every row comes back,
    in ``entity_df``'s order, with its timestamps; an entity with no snapshot yet (brand new)
    gets zeros.

    Each view of the service is asked for once per distinct (its entity key, timestamp) and
    the answers are spread back over the rows: a user's candidates at one moment are one user
    row to Feast, not one per candidate (the replay's 2 x 10^6 candidate rows of a round are
    10^4 users), and a basket's items share one user row. It also sidesteps two quirks of
    Feast 0.67's file store: it keeps one row per (user_id, event_timestamp) when it joins
    the user view, and it drops some entity rows older than any snapshot of their entity.

    Feast is asked ``feast.historical_chunk_rows`` distinct rows at a time: both of its
    offline stores bring an answer back whole into one process (the Spark store through its
    driver), so a training set's millions of rows in one request run out of memory.
    """
    import numpy as np
    import pandas as pd

    ts = S.ENTITY_TIMESTAMP
    out = entity_df.reset_index(drop=True).copy()
    at = out.assign(**{ts: pd.to_datetime(out[ts], utc=True)})
    store = open_store(settings)
    service = store.get_feature_service("recommender_training")
    for view in service.feature_view_projections:
        keys = [*store.get_feature_view(view.name).join_keys, ts]
        names = [f.name for f in view.features]
        distinct = at[keys].drop_duplicates().reset_index(drop=True)
        distinct["_row"] = np.arange(len(distinct))
        refs = [f"{view.name}:{n}" for n in names]
        step = settings.feast.historical_chunk_rows  # each answer is collected whole
        got = pd.concat(
            [store.get_historical_features(entity_df=distinct.iloc[lo : lo + step],
                                           features=refs).to_df()
             for lo in range(0, len(distinct), step)]
            or [distinct.iloc[:0].reindex(columns=[*distinct.columns, *names])],
            ignore_index=True,
        )  # fmt: skip
        rows = at[keys].merge(distinct, on=keys, how="left")["_row"].to_numpy()
        values = got.set_index("_row")[names].reindex(rows)  # a dropped row: NaN, then 0
        for n in names:
            out[n] = values[n].to_numpy()
    for f in (*S.USER_FEATURES, *S.ITEM_FEATURES):
        out[f] = out[f].astype("float32").fillna(0.0)  # no snapshot yet: a brand-new entity
    return out


def delete_online_rows(settings: Settings, join_key: str, values: list[str]) -> int:
    """Delete every online row of these entities, in every feature view keyed by
    ``join_key``; the number of rows (SQLite) or entity keys (Redis) removed.

    Feast has no delete API for entity values, so this goes through the online store Feast
    opened, with Feast's own key serialization: SQLite rows are ``(entity_key, feature)``
    per view table; Redis holds one hash per entity key and project, all views in it.
    """
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import _redis_key, compute_table_id
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    store = open_store(settings)
    config = store.config
    keys = [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=v)]) for v in values]
    if not keys:
        return 0
    version = config.entity_key_serialization_version
    if settings.feast.online_store == "redis":
        client = redis_client(store)
        return int(client.delete(*[_redis_key(config.project, k, version) for k in keys]))
    views = [v for v in store.list_feature_views() if v.join_keys == [join_key]]
    blobs = [serialize_entity_key(k, entity_key_serialization_version=version) for k in keys]
    conn = store._get_provider().online_store._get_conn(config)
    removed = 0
    with conn:
        for view in views:
            table = compute_table_id(
                config.project, view, config.registry.enable_online_feature_view_versioning
            )
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)
            ).fetchone()
            if exists:
                marks = ",".join("?" * len(blobs))
                cur = conn.execute(f'DELETE FROM "{table}" WHERE entity_key IN ({marks})', blobs)
                removed += cur.rowcount
    return removed


def fail_fast(store: FeatureStore, settings: Settings, timeout_s: float) -> None:
    """Make the store's Redis client give up after ``timeout_s`` without retrying.

    redis-py retries a failed command three times with exponential backoff (1 s base): right
    for a nightly materialization, wrong for a request with a 30 ms budget. With Redis down,
    every online read of the service took seconds and the requests queued behind it timed
    out (``benchmarks/chaos.py``, before this). Feast builds its client from the connection
    string and has no option for the retry policy, so it is set on the client Feast made.
    SQLite (embedded) needs nothing: it is a local file.
    """
    if settings.feast.online_store != "redis":
        return
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis_client(store)
    client.connection_pool.connection_kwargs.update(
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    client.set_retry(Retry(NoBackoff(), 0))


def redis_client(store: FeatureStore):
    """The redis-py client Feast's Redis online store reads and writes with (made on first
    use). Feast exposes it through no public API; this is the one place that reaches it."""
    return store._get_provider().online_store._get_client(store.config.online_store)
