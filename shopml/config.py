"""Typed configuration with two profiles: ``embedded`` (default) and ``production``.

The profile selects backends, never code paths: the same functions run against SQLite and
files on one machine, or PostgreSQL, Redis and a Spark cluster in production. Every field can
be set from the environment with the ``SHOPML_`` prefix and ``__`` for nesting, e.g.
``SHOPML_PROFILE=production`` or ``SHOPML_TRAIN__EPOCHS=3``.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shopml.paths import Paths


class Profile(StrEnum):
    EMBEDDED = "embedded"
    PRODUCTION = "production"


class SparkConfig(BaseModel):
    """How Spark jobs get a session. ``master`` is ``local[*]`` embedded, a cluster URL in prod."""

    master: str = "local[*]"
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(4, ge=1)


class TrainConfig(BaseModel):
    """Hyperparameters of the two-tower recommender and how many Horovod workers train it."""

    epochs: int = Field(10, ge=1)
    workers: int = Field(2, ge=1, description="Horovod processes (horovodrun -np)")
    batch_size: int = Field(512, ge=8, description="per worker")
    lr: float = Field(2e-3, gt=0, description="base LR, scaled by the number of workers")
    dim: int = Field(64, ge=4)
    negatives: int = Field(1024, ge=1, description="shared sampled negatives per batch")
    weight_decay: float = Field(1e-6, ge=0)
    seed: int = 42


class EvalConfig(BaseModel):
    k: int = Field(10, ge=1)
    promotion_margin: float = Field(
        0.0, ge=0, description="relative NDCG@k gain over baseline and champion needed to promote"
    )


class FeastConfig(BaseModel):
    """Feast backends. Embedded: SQLite online store and file registry under SHOPML_HOME."""

    online_store: str = "sqlite"  # or "redis"
    redis_connection: str = "127.0.0.1:6379"
    registry: str | None = None  # a path or a SQLAlchemy URL; default under SHOPML_HOME
    project: str = "shopml"


class Settings(BaseSettings):
    """All of ShopML's configuration. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix="SHOPML_", env_nested_delimiter="__")

    profile: Profile = Profile.EMBEDDED
    home: Path = Field(default_factory=lambda: Path.cwd() / "var")
    anchor_date: str = Field("2025-01-01", description="Instacart timeline anchor (see README)")
    mlflow_tracking_uri: str | None = None
    mlflow_artifact_root: str | None = None
    model_name: str = "shopml-recommender"
    spark: SparkConfig = SparkConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    feast: FeastConfig = FeastConfig()

    @model_validator(mode="after")
    def _production_needs_servers(self) -> Settings:
        if self.profile is Profile.PRODUCTION and not self.mlflow_tracking_uri:
            raise ValueError(
                "profile=production needs SHOPML_MLFLOW_TRACKING_URI "
                "(e.g. postgresql://user@host/mlflow)"
            )
        return self

    @property
    def paths(self) -> Paths:
        return Paths(self.home.resolve())

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking + registry URI; SQLite under SHOPML_HOME when embedded."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.paths.mlflow / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.mlflow_artifact_root or (self.paths.mlflow / "artifacts").as_uri()

    @property
    def feast_registry(self) -> str:
        return self.feast.registry or str(self.paths.feast / "registry.db")


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (e.g. from DAG Params) on top."""
    return Settings(**overrides)  # type: ignore[arg-type]


def service_environment(settings: Settings) -> dict[str, str]:
    """Environment variables the engines read, so subprocesses see the same backends.

    Why: ``feast``, ``mlflow`` and ``horovodrun`` child processes do not receive our Python
    objects, only the environment; this is the single place that translates settings for them.
    """
    env = {
        "SHOPML_HOME": str(settings.paths.home),
        "SHOPML_PROFILE": settings.profile.value,
        "MLFLOW_TRACKING_URI": settings.tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
        "SHOPML_FEATURES_DIR": str(settings.paths.features),
        "SHOPML_FEAST_REGISTRY": settings.feast_registry,
        "SHOPML_FEAST_ONLINE_PATH": str(settings.paths.feast / "online.db"),
        "SHOPML_FEAST_REDIS": settings.feast.redis_connection,
        "SHOPML_FEAST_PROJECT": settings.feast.project,
    }
    if settings.mlflow_tracking_uri:
        env["SHOPML_MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    return env


def settings_from_params(params: dict[str, object]) -> Settings:
    """Settings for one DAG run: the environment, overridden by the trigger form's Params."""
    base = load_settings()
    train = base.train.model_copy(
        update={k: params[k] for k in ("epochs", "workers") if params.get(k) is not None}
    )
    evaluation = base.eval.model_copy(
        update={"promotion_margin": params["promotion_margin"]}
        if params.get("promotion_margin") is not None
        else {}
    )
    return base.model_copy(update={"train": train, "eval": evaluation})
