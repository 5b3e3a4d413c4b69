"""The ``shopml`` command: every DAG task, runnable by a person, a test or a pod.

Each command is a thin shell over the stage function the Airflow task calls.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated

import typer

from shopml.config import load_settings

app = typer.Typer(help="ShopML: batch ML for e-commerce recommendation.", no_args_is_help=True)

DsOption = Annotated[str, typer.Option("--ds", help="logical date, YYYY-MM-DD")]


def _ds(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"--ds must be YYYY-MM-DD, got {value!r}") from exc


def _echo(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


@app.command()
def land(
    ds: DsOption,
    source: Annotated[
        str | None,
        typer.Option(help="'instacart' or a canonical Parquet dir (SHOPML_LAND__SOURCE)"),
    ] = None,
    max_users: Annotated[
        int | None, typer.Option(help="keep the N smallest user ids (SHOPML_LAND__MAX_USERS)")
    ] = None,
) -> None:
    """Land the source into the raw lake's --ds partition (events by event_date inside)."""
    from shopml.config import settings_from_params
    from spark_jobs.jobs import land as run

    _echo(run(settings_from_params({"source": source, "max_users": max_users}), _ds(ds)))


@app.command("validate-raw")
def validate_raw(ds: DsOption) -> None:
    """Great Expectations on raw events and catalog; quarantines bad partitions."""
    from validation.run import validate_raw as run

    _echo([r.summary() for r in run(load_settings(), _ds(ds))])


@app.command()
def clean(ds: DsOption) -> None:
    """Spark cleaning of events up to --ds; rejected rows go to quarantine."""
    from spark_jobs.jobs import clean as run

    _echo(run(load_settings(), _ds(ds)))


@app.command()
def features(ds: DsOption) -> None:
    """Spark user/item daily feature snapshots."""
    from spark_jobs.jobs import build_features as run

    _echo(run(load_settings(), _ds(ds)))


@app.command("validate-features")
def validate_features(ds: DsOption) -> None:
    """Great Expectations on the feature snapshots."""
    from validation.run import validate_features as run

    _echo([r.summary() for r in run(load_settings(), _ds(ds))])


@app.command("feast-sync")
def feast_sync(ds: DsOption) -> None:
    """feast apply + materialize(-incremental) up to the end of --ds."""
    from shopml import feast_store

    settings, day = load_settings(), _ds(ds)
    typer.echo(feast_store.apply(settings, day))
    typer.echo(feast_store.materialize(settings, day))


@app.command("training-set")
def training_set(ds: DsOption) -> None:
    """Point-in-time training set from Feast, plus the holdout."""
    from training.data import build_training_set

    _echo(build_training_set(load_settings(), _ds(ds)))


@app.command()
def train(ds: DsOption) -> None:
    """Train with horovodrun (workers from SHOPML_TRAIN__WORKERS)."""
    from training.pipeline import train as run

    _echo(run(load_settings(), _ds(ds)))


@app.command("train-ranker")
def train_ranker(ds: DsOption) -> None:
    """The serving ranker on the run's purchases and point-in-time Feast features."""
    from training.ranking import train_ranker as run

    _echo(run(load_settings(), _ds(ds)))


@app.command()
def compress(ds: DsOption) -> None:
    """int8 dynamic quantization of the run's model."""
    from training.pipeline import compress as run

    _echo(run(load_settings(), _ds(ds)))


@app.command()
def evaluate(ds: DsOption) -> None:
    """Model, int8, baselines and champion on the holdout."""
    from training.pipeline import evaluate as run

    run(load_settings(), _ds(ds))


@app.command()
def promote(ds: DsOption) -> None:
    """Register the model; move the champion alias only if it is better."""
    from training.pipeline import promote as run

    _echo(run(load_settings(), _ds(ds)).__dict__)


@app.command()
def ledger(
    as_json: Annotated[bool, typer.Option("--json", help="every field, as JSON")] = False,
    last: Annotated[int | None, typer.Option(min=1, help="only the newest N entries")] = None,
) -> None:
    """Every gate decision and rollback of the served model, oldest first (MLflow experiment
    shopml-promotions)."""
    from training import ledger as book

    settings = load_settings()
    items = book.entries(settings, settings.model_name)[-last if last else None :]
    typer.echo(book.as_json(items) if as_json else "\n".join(e.line() for e in items))


@app.command()
def rollback(
    to: Annotated[
        str | None, typer.Option(help="version to serve; default: the champion before this one")
    ] = None,
    reason: Annotated[str, typer.Option(help="why, for the ledger")] = "",
) -> None:
    """Move the champion alias back (recorded in the ledger; no version is deleted)."""
    from training import ledger as book

    entry = book.rollback(load_settings(), to, reason)
    typer.echo(entry.line())


def _protocol(dataset: str):
    """The named benchmark protocol, or a usage error listing the known ones."""
    from zoo.compare import PROTOCOLS

    if dataset not in PROTOCOLS:
        raise typer.BadParameter(f"--dataset must be one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[dataset]


@app.command()
def zoo(
    dataset: Annotated[str, typer.Option(help="movielens-100k or instacart")] = "instacart",
    models: Annotated[str, typer.Option(help="comma-separated zoo model names")] = (
        "popularity,personal_top_frequency,user_knn"
    ),
    configs: Annotated[str, typer.Option(help='JSON: {"user_knn": {"neighbors": 50}}')] = "{}",
) -> None:
    """Fit and evaluate zoo models on a dataset's protocol; print the table."""
    from zoo import build
    from zoo.compare import compare, format_table, protocol_split

    protocol = _protocol(dataset)
    cfg = json.loads(configs)
    wanted = {m: (m, cfg.get(m, {})) for m in models.split(",")}
    for name, config in wanted.values():
        build(name, **config)  # fail on a typo before loading any data
    table, _ = compare(wanted, protocol_split(protocol), protocol.k, protocol.exclude_seen)
    typer.echo(f"protocol: {table.attrs['protocol']}")
    typer.echo(format_table(table))


@app.command()
def tune(
    model: Annotated[str, typer.Option(help="zoo model to tune")],
    dataset: Annotated[str, typer.Option(help="movielens-100k or instacart")] = "instacart",
    trials: Annotated[int, typer.Option(min=1, help="Optuna TPE trials")] = 20,
) -> None:
    """Optuna search on a validation split inside the training part; trials are nested
    MLflow runs (experiment shopml-tuning). Prints the best config as JSON."""
    import mlflow

    from training import registry
    from zoo.compare import protocol_split, validation_split
    from zoo.tune import tune as run

    protocol = _protocol(dataset)
    settings = load_settings()
    registry.use_tracking(settings)
    if mlflow.get_experiment_by_name("shopml-tuning") is None:
        mlflow.create_experiment("shopml-tuning", artifact_location=settings.artifact_root)
    mlflow.set_experiment("shopml-tuning")
    val = validation_split(protocol, protocol_split(protocol))
    best, score, _ = run(model, val, trials, protocol.k, protocol.exclude_seen,
                         log_to_mlflow=True)  # fmt: skip
    _echo({"model": model, "val_ndcg": score, "config": best})


@app.command("batch-score")
def batch_score(
    ds: DsOption,
    k: Annotated[int, typer.Option(min=1, max=1000, help="items per user")] = 100,
    to_online: Annotated[
        bool, typer.Option(help="also write the lists to Feast (view user_recommendations)")
    ] = False,
    explain: Annotated[
        bool, typer.Option(help="add each item's reasons (a JSON column), as ?explain=true")
    ] = False,
) -> None:
    """Top-k of the champion for every user to lake/recommendations/ds=... (Parquet)."""
    from serving.batch import batch_score as run

    _echo(run(load_settings(), _ds(ds), k, to_online, explain))


@app.command()
def forget(
    user: Annotated[str, typer.Option("--user", help="the user's id as the retailer knows it")],
) -> None:
    """Forget one user: their events leave every lake partition, their Feast online rows and
    precomputed lists go, and every later land drops them (reruns and backfills included)."""
    from shopml.privacy import forget as run

    _echo(run(load_settings(), user).summary())


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="processes (one per core; Prometheus aggregated)")
    ] = 1,
    access_log: Annotated[
        bool,
        typer.Option(help="uvicorn's access log: it names client IPs and raw ids in paths"),
    ] = False,
) -> None:
    """Serve the champion over HTTP: two-stage recommendations, similar items, batch, metrics.

    Each request logs one JSON line (the user's pseudonym, arm, version, fallback, per-stage
    ms); no IP and no raw id unless asked for (``privacy``). The work is
    CPU-bound and one process uses about one core: ``--workers`` uses more (on Kubernetes,
    keep 1 and scale replicas)."""
    import uvicorn

    from serving.app import serving_app

    if workers == 1:
        uvicorn.run(serving_app(), host=host, port=port, access_log=access_log)
        return
    import tempfile

    from serving.observability import use_multiprocess_metrics

    with tempfile.TemporaryDirectory(prefix="shopml-metrics-") as metrics_dir:
        use_multiprocess_metrics(metrics_dir)  # inherited by every worker
        uvicorn.run("serving.app:serving_app", factory=True, workers=workers, host=host,
                    port=port, access_log=access_log)  # fmt: skip


@app.command()
def stream(
    once: Annotated[
        bool, typer.Option(help="process what the stream holds now, then stop (tests, backfills)")
    ] = False,
) -> None:
    """Run the session-features streaming job: events of POST /events -> Spark Structured
    Streaming (watermarked session aggregates) -> Feast push source -> online store.

    Checkpointed under $SHOPML_HOME/stream/checkpoints: a restart resumes after the last
    committed micro-batch. Needs a Feast registry that knows the push source (any nightly
    run's feast_sync)."""
    from spark_jobs.streaming import start_session_features

    query = start_session_features(load_settings(), once=once)
    query.awaitTermination()
    _echo({"query": query.name, "batches": len(query.recentProgress),
           "rows": sum(int(b.get("numInputRows", 0)) for b in query.recentProgress)})  # fmt: skip


@app.command()
def intraday(
    until: Annotated[
        str, typer.Option(help="the window's end, ISO-8601 (UTC unless it names a zone)")
    ],
    eval_hours: Annotated[
        float | None,
        typer.Option(help="the most recent hours held out (SHOPML_INTRADAY__EVAL_HOURS)"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="passes over the new purchases (SHOPML_INTRADAY__EPOCHS)")
    ] = None,
) -> None:
    """The intraday_update DAG in one process: the champion's two-tower warm-started on the
    purchases streamed since its data ended, judged on the last hours, registered as the
    ``challenger`` (training/intraday.py)."""
    from shopml.config import settings_from_params
    from training import intraday as stage

    try:
        when = stage.utc(until)
    except ValueError as exc:
        raise typer.BadParameter(f"--until must be ISO-8601, got {until!r}") from exc
    settings = settings_from_params({"eval_hours": eval_hours, "intraday_epochs": epochs})
    try:
        _echo(stage.run(settings, when))
    except (stage.NoChampion, stage.NothingToLearn) as exc:
        typer.echo(f"no update: {exc}", err=True)
        raise typer.Exit(0) from exc


@app.command()
def synth(
    events: Annotated[int, typer.Option(min=1, help="rows of the interaction log")],
    users: Annotated[int, typer.Option(min=1, help="shoppers")],
    items: Annotated[int, typer.Option(min=1, help="products")],
    out: Annotated[str, typer.Option(help="directory for events/ and items/ (replaced)")],
    days: Annotated[int, typer.Option(min=1, help="the timeline's length, to 2025-12-30")] = 120,
    defect_rate: Annotated[float, typer.Option(min=0, max=0.99, help="defective rows")] = 0.001,
    seed: Annotated[int, typer.Option(help="same seed and sizes, same rows")] = 42,
) -> None:
    """A synthetic retailer in the canonical schema, with Spark (spark_jobs/synth.py): Zipf
    popularity, periodic repeat purchases, view -> click/cart/purchase funnels, defects.
    A benchmark and test input (`land --source OUT`), never the demo's data."""
    from pathlib import Path

    from spark_jobs.session import get_spark
    from spark_jobs.synth import Shape, write

    shape = Shape(events, users, items, days=days, defect_rate=defect_rate, seed=seed)
    spark = get_spark(load_settings().spark, "shopml-synth")
    _echo(write(spark, shape, Path(out)))


# --- search (dags/search_retrain.py): `shopml search <stage> --ds ...` -------------------------
search_app = typer.Typer(help="The product search pipeline's stages (the search_retrain DAG).")
app.add_typer(search_app, name="search")


@search_app.command("data")
def search_data(ds: DsOption) -> None:
    """Spark: product corpus, held-out queries and graded pairs with BM25 hard negatives."""
    from spark_jobs.search_data import build_search_data

    _echo(build_search_data(load_settings(), _ds(ds)))


@search_app.command("validate")
def search_validate(ds: DsOption) -> None:
    """Great Expectations on the corpus, queries and pairs (leakage included)."""
    from validation.search import validate_search

    _echo([r.summary() for r in validate_search(load_settings(), _ds(ds))])


@search_app.command("train-bi-encoder")
def search_train_bi_encoder(ds: DsOption) -> None:
    """MiniLM bi-encoder, in-batch + hard negatives, Horovod (SHOPML_SEARCH__WORKERS)."""
    from training.search import train_bi_encoder

    _echo(train_bi_encoder(load_settings(), _ds(ds)))


@search_app.command("train-cross-encoder")
def search_train_cross_encoder(ds: DsOption) -> None:
    """MiniLM cross-encoder reranker on graded pairs, Horovod."""
    from training.search import train_cross_encoder

    _echo(train_cross_encoder(load_settings(), _ds(ds)))


@search_app.command("index")
def search_index(ds: DsOption) -> None:
    """BM25 (bm25s) and faiss indexes: the bundle serving loads, and the zero-shot one."""
    from training.search import build_index

    _echo(build_index(load_settings(), _ds(ds)))


@search_app.command("evaluate")
def search_evaluate(ds: DsOption) -> None:
    """Every configuration, chosen on validation queries, measured on test queries."""
    from training.search import evaluate_search

    evaluate_search(load_settings(), _ds(ds))


@search_app.command("compress")
def search_compress(ds: DsOption) -> None:
    """Distil, prune, quantize and export the cross-encoder; the gate picks what serves."""
    from training.search import compress_search

    _echo(compress_search(load_settings(), _ds(ds)))


@search_app.command("promote")
def search_promote(ds: DsOption) -> None:
    """Register shopml-search; move its champion alias only through the gate."""
    from training.search import promote_search

    _echo(promote_search(load_settings(), _ds(ds)))


if __name__ == "__main__":
    app()
