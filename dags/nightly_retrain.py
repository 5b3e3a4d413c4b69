"""
### ShopML nightly retrain

Lands the interaction logs and catalog, validates them with Great Expectations, cleans and
engineers features with Spark, syncs Feast, trains the two-tower recommender with Horovod
and the candidate ranker serving uses, compresses and evaluates it against the baselines
and the current champion, and moves the MLflow `champion` alias only when the new model is
better. The registered version carries its faiss index and candidate tables for serving;
with `precompute_k` set, the champion's top-k for every user is also written out.

Every task reads and writes the partition of the run's logical date (`ds`), so a rerun of a
date overwrites its outputs. A failed validation stops the run before training: the
champion stays. Each task is also `shopml <command> --ds YYYY-MM-DD`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, chain, dag, task


def _environment():
    """The Settings of the environment (pydantic only: no engine is touched at parse time)."""
    from shopml.config import load_settings

    return load_settings()


_ENV = _environment()  # the Params' defaults are the environment's settings
_EVAL = _ENV.eval

PARAMS = {
    "source": Param(
        "instacart",
        type="string",
        title="Data source",
        description="'instacart' (the bundled real sample) or a directory with events/ and "
        "items/ Parquet in the canonical schema.",
    ),
    "max_users": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Max users",
        description="Keep only the N smallest user ids (quick runs). Empty: all users.",
    ),
    "epochs": Param(10, type="integer", minimum=1, maximum=200, title="Training epochs"),
    "workers": Param(
        2,
        type="integer",
        minimum=1,
        maximum=64,
        title="Horovod workers",
        description="Processes started by horovodrun -np.",
    ),
    "served_study_trials": Param(
        _ENV.train.served_study_trials,
        type="integer",
        minimum=0,
        maximum=500,
        title="Served configuration trials",
        description="Optuna trials that choose the served path's source quotas, ranking depth "
        "and ranker (size, features) on validation, the current settings first; 0 serves the "
        "settings' configuration.",
    ),
    "promotion_margin": Param(
        0.0,
        type="number",
        minimum=0,
        maximum=1,
        title="Promotion margin",
        description="Relative: the lower bound of the paired-bootstrap NDCG@10 gain over the "
        "champion (first run: popularity) must exceed margin x its mean.",
    ),
    "models": Param(
        _EVAL.models,
        type="array",
        items={"type": "string"},
        title="Zoo models",
        description="Models of the zoo also fitted and evaluated on the run's holdout (each a "
        "nested MLflow run): recent_popularity, item_knn, user_knn, ease, als, content_tfidf, "
        "sasrec, hybrid (popularity and personal_top_frequency always run; the zoo's two_tower "
        "is the run's own model).",
    ),
    "precompute_k": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        maximum=1000,
        title="Precompute top-k",
        description="After promotion, write the champion's top-k for every user to "
        "lake/recommendations/ds=... and Feast's online store (view user_recommendations), "
        "for retailers who precompute. Empty: skip (the service answers online).",
    ),
    "model_configs": Param(
        _EVAL.model_configs,  # tuned on Instacart: shopml.config.EvalConfig
        type="object",
        title="Zoo model configs",
        description="Per model, its config (`shopml tune` finds one). Models without an entry "
        "use their defaults.",
    ),
}


# Spark stages run in-process (embedded) or through spark-submit on the Airflow connection
# (production: SHOPML_SPARK__SUBMIT=true, i.e. SparkConfig.submit); same entry points either
# way (spark_jobs/jobs.py).
SPARK_JOBS = Path(__file__).resolve().parents[1] / "spark_jobs" / "jobs.py"


def _spark_submit(task_id: str, conn_id: str, *args: str):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    return SparkSubmitOperator(
        task_id=task_id,
        application=str(SPARK_JOBS),
        application_args=list(args),
        conn_id=conn_id,
        name=f"shopml-{task_id}",
    )


def _settings(params):
    from shopml.config import settings_from_params

    return settings_from_params(dict(params))


def _validate(suite: str, params, ds: str) -> None:
    """Run a validation stage; bad data fails the task for good (retrying cannot help)."""
    from airflow.exceptions import AirflowFailException

    from validation import run

    try:
        for report in getattr(run, suite)(_settings(params), _day(ds)):
            print(report.summary())
    except run.ValidationFailed as exc:
        raise AirflowFailException(str(exc)) from exc


def _day(ds: str):
    from datetime import date

    return date.fromisoformat(ds)


@dag(
    dag_id=Path(__file__).stem,
    schedule=_environment().schedule,  # SHOPML_SCHEDULE; 'none' makes the DAG manual-only
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["shopml", "recommendation"],
    params=PARAMS,
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
)
def nightly_retrain():
    @task
    def land(ds=None, params=None):
        from spark_jobs.jobs import land as run

        print(run(_settings(params), _day(ds)))

    @task(retries=0)
    def validate_raw(ds=None, params=None):
        _validate("validate_raw", params, ds)

    @task
    def clean(ds=None, params=None):
        from spark_jobs.jobs import clean as run

        print(run(_settings(params), _day(ds)))

    @task
    def build_features(ds=None, params=None):
        from spark_jobs.jobs import build_features as run

        print(run(_settings(params), _day(ds)))

    @task(retries=0)
    def validate_features(ds=None, params=None):
        _validate("validate_features", params, ds)

    @task
    def feast_sync(ds=None, params=None):
        from shopml import feast_store

        s = _settings(params)
        print(feast_store.apply(s, _day(ds)))
        print(feast_store.materialize(s, _day(ds)))

    @task
    def training_set(ds=None, params=None):
        from training.data import build_training_set

        print(build_training_set(_settings(params), _day(ds)))

    @task
    def train(ds=None, params=None):
        from training.pipeline import train as run

        print(run(_settings(params), _day(ds)))

    @task
    def train_ranker(ds=None, params=None):
        from training.ranking import train_ranker as run

        print(run(_settings(params), _day(ds)))

    @task
    def compress(ds=None, params=None):
        from training.pipeline import compress as run

        print(run(_settings(params), _day(ds)))

    @task
    def evaluate(ds=None, params=None):
        from training.pipeline import evaluate as run

        run(_settings(params), _day(ds))

    @task
    def promote(ds=None, params=None):
        from training.pipeline import promote as run

        print(run(_settings(params), _day(ds)))

    @task
    def batch_score(ds=None, params=None):
        from airflow.exceptions import AirflowSkipException

        if not params.get("precompute_k"):
            raise AirflowSkipException("precompute_k is empty: nothing to precompute")
        from serving.batch import batch_score as run

        print(run(_settings(params), _day(ds), params["precompute_k"], to_online=True))

    spark = _environment().spark
    if spark.submit:
        spark_stages = (
            _spark_submit(
                "land",
                spark.conn_id,
                "land",
                "--ds={{ ds }}",
                "--source={{ params.source }}",
                "--max-users={{ params.max_users or '' }}",
            ),
            _spark_submit("clean", spark.conn_id, "clean", "--ds={{ ds }}"),
            _spark_submit("build_features", spark.conn_id, "features", "--ds={{ ds }}"),
        )
    else:
        spark_stages = (land(), clean(), build_features())

    chain(
        spark_stages[0],
        validate_raw(),
        spark_stages[1],
        spark_stages[2],
        validate_features(),
        feast_sync(),
        training_set(),
        train(),
        train_ranker(),
        compress(),
        evaluate(),
        promote(),
        batch_score(),
    )


nightly_retrain()
