"""ShopML's Feast objects: entities, sources over the Spark feature snapshots, feature views
and the feature services training and serving read.

Declarative only: `feast apply` imports this file. ``SHOPML_FEATURES_DIR`` points the sources
at the run's snapshot (``lake/features/ds=YYYY-MM-DD``); `shopml` sets it before applying.
"""

import json
import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_source import DataSource
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Array, Float32, Int64, String

# Column names are fixed by shopml.schema; literals here keep this file importable by feast
# alone, and tests/test_feast.py asserts both agree.
_FEATURES_DIR = os.environ.get("SHOPML_FEATURES_DIR", "data/features")
_RECOMMENDATIONS_DIR = os.environ.get("SHOPML_RECOMMENDATIONS_DIR", "data/recommendations")
_SESSIONS_DIR = os.environ.get("SHOPML_SESSIONS_DIR", "data/session_features")
# Each offline store reads its own source class: FileSource (Dask) or SparkSource; the store
# is the YAML's offline_store block, which `shopml` passes as JSON.
_OFFLINE = json.loads(os.environ.get("SHOPML_FEAST_OFFLINE_STORE", '{"type": "file"}'))["type"]


def _snapshots(name: str, path: str, timestamp_field: str, description: str) -> DataSource:
    """A Parquet directory of the lake that the offline store reads (training joins and
    materialization), as the configured store reads it.

    Views written to the online store only (recommendations, pushed sessions) keep a
    FileSource under either store: `feast apply` makes the Spark store read every
    SparkSource to validate it, and their offline directories may not exist yet.
    """
    if _OFFLINE == "spark":
        return SparkSource(
            name=name,
            path=path,
            file_format="parquet",
            timestamp_field=timestamp_field,
            description=description,
        )
    return FileSource(
        name=name, path=path, timestamp_field=timestamp_field, description=description
    )


# --- entities ---------------------------------------------------------------------------------
user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A shopper, by the retailer's user id",
)
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalog product, by the retailer's item id",
)

# --- sources ----------------------------------------------------------------------------------
user_source = _snapshots(
    name="user_daily_snapshots",
    path=f"{_FEATURES_DIR}/user",
    timestamp_field="feature_timestamp",
    description="Cumulative user features per active day, valid from the next midnight",
)
item_source = _snapshots(
    name="item_daily_snapshots",
    path=f"{_FEATURES_DIR}/item",
    timestamp_field="feature_timestamp",
    description="Cumulative item features per active day, valid from the next midnight",
)

recommendations_source = FileSource(
    name="user_top_k",
    path=f"{_RECOMMENDATIONS_DIR}/latest",
    timestamp_field="scored_at",
    description="Precomputed top-k per user from `shopml batch-score` (latest run)",
)

# Session features are pushed by the streaming job (spark_jobs/streaming.py), never
# materialized: `store.push("session_push", ...)` writes the online store directly.
session_push = PushSource(
    name="session_push",
    batch_source=FileSource(
        name="session_snapshots",
        path=_SESSIONS_DIR,
        timestamp_field="event_timestamp",
        description="Offline copy of pushed session features",
    ),
    description="Each shopper's current session, computed by Spark Structured Streaming",
)

# --- feature views ----------------------------------------------------------------------------
# TTL: a shopper's last snapshot stays valid for a year of inactivity (monthly shoppers exist).
user_features = FeatureView(
    name="user_features",
    entities=[user],
    ttl=timedelta(days=365),
    schema=[
        Field(name="user_n_events", dtype=Int64),
        Field(name="user_n_purchases", dtype=Int64),
        Field(name="user_n_baskets", dtype=Int64),
        Field(name="user_n_distinct_items", dtype=Int64),
        Field(name="user_reorder_rate", dtype=Float32),
        Field(name="user_avg_basket_size", dtype=Float32),
        Field(name="user_days_since_prior", dtype=Float32),
    ],
    source=user_source,
    online=True,
    tags={"team": "shopml"},
)
item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=timedelta(days=365),
    schema=[
        Field(name="item_n_events", dtype=Int64),
        Field(name="item_n_purchases", dtype=Int64),
        Field(name="item_n_users", dtype=Int64),
        Field(name="item_reorder_rate", dtype=Float32),
        Field(name="item_purchases_30d", dtype=Int64),
    ],
    source=item_source,
    online=True,
    tags={"team": "shopml"},
)

# Written by `shopml batch-score --to-online` (write_to_online_store), never materialized:
# retailers who precompute read a user's list with one online lookup.
user_recommendations = FeatureView(
    name="user_recommendations",
    entities=[user],
    ttl=timedelta(days=2),
    schema=[
        Field(name="recommended_items", dtype=Array(String)),
        Field(name="recommended_scores", dtype=Array(Float32)),
        Field(name="model_version", dtype=String),
    ],
    source=recommendations_source,
    online=True,
    tags={"team": "shopml"},
)

# A shopper's current session (their latest, by last event), as of the last micro-batch.
session_features = FeatureView(
    name="session_features",
    entities=[user],
    ttl=timedelta(days=1),
    schema=[
        Field(name="session_id", dtype=String),
        Field(name="session_items", dtype=Array(String)),
        Field(name="session_length", dtype=Int64),
        Field(name="session_last_category", dtype=String),
        Field(name="session_last_event_ms", dtype=Int64),
    ],
    source=session_push,
    online=True,
    tags={"team": "shopml"},
)

# --- feature services -------------------------------------------------------------------------
recommender_training = FeatureService(
    name="recommender_training", features=[user_features, item_features]
)
recommender_serving = FeatureService(name="recommender_serving", features=[user_features])
