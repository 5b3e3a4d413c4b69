"""Public benchmark data in the canonical schema, read from installed packages (no downloads).

* MovieLens-100K ships in ``recbole`` (installed with ``--no-deps`` by scripts/setup.sh): the
  dataset of Microsoft Recommenders' published benchmark table.
* Instacart is read by the pipeline's own reader (``spark_jobs.ingest``) and collected.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pandas as pd

from mlkit.interactions import RATING
from shopml import schema as S


def _package_file(dist: str, relative: str) -> Path:
    try:
        path = Path(str(metadata.distribution(dist).locate_file(relative)))
    except metadata.PackageNotFoundError as err:
        raise RuntimeError(f"the '{dist}' package is not installed: run `make install`") from err
    if not path.exists():
        raise RuntimeError(f"{dist} is installed but {path} is missing")
    return path


def movielens_100k() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, items) of MovieLens-100K: 100,000 ratings of 1,682 movies by 943 users.

    Every rating is an interaction (implicit feedback, as in Microsoft Recommenders' ranking
    benchmark); the rating itself is kept in ``rating``. Items get title and genres as text.
    """
    inter = _package_file("recbole", "recbole/dataset_example/ml-100k/ml-100k.inter")
    raw = pd.read_csv(inter, sep="\t")
    raw.columns = [c.split(":")[0] for c in raw.columns]
    events = pd.DataFrame(
        {
            S.USER_ID: raw["user_id"].astype(str),
            S.ITEM_ID: raw["item_id"].astype(str),
            S.EVENT_TYPE: "view",
            S.TIMESTAMP: pd.to_datetime(raw["timestamp"], unit="s", utc=True),
            RATING: raw["rating"].astype("float32"),
        }
    )
    item_file = inter.with_suffix(".item")
    meta = pd.read_csv(item_file, sep="\t", dtype=str)
    meta.columns = [c.split(":")[0] for c in meta.columns]
    items = pd.DataFrame(
        {
            S.ITEM_ID: meta["item_id"],
            S.TITLE: meta["movie_title"],
            S.CATEGORY: meta["class"].fillna(""),
            S.PRICE: float("nan"),
        }
    )
    return events, items


def instacart(max_users: int | None = None, anchor_date: str | None = None) -> pd.DataFrame:
    """Instacart purchase events, read by the pipeline's own reader (``spark_jobs.ingest``).

    The one Instacart reader: the same timestamp rule and id forms as ``land``, so a benchmark
    ranks exactly the events the nightly DAG trains on; collected to pandas (150k rows).
    """
    from shopml.config import load_settings
    from spark_jobs.ingest import INSTACART, RAW_TIMESTAMP, keep_first_users, read_source
    from spark_jobs.session import get_spark

    settings = load_settings()
    spark = get_spark(settings.spark, "shopml-datasets")
    events, _ = read_source(spark, INSTACART, anchor_date or settings.anchor_date)
    if max_users:
        events = keep_first_users(events, max_users)
    out = events.drop(S.QUERY, RAW_TIMESTAMP).toPandas()
    out[S.TIMESTAMP] = pd.to_datetime(out[S.TIMESTAMP]).dt.tz_localize("UTC")  # session is UTC
    return out.sort_values([S.USER_ID, S.TIMESTAMP], kind="stable").reset_index(drop=True)
