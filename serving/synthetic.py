"""A synthetic deployment in the canonical schema: catalog, purchases, Feast features and a
registered champion, at any scale, through the same code the nightly pipeline uses.

For load tests (``benchmarks/serving.py``: 100k items, more than the real samples have) and
for the service's own tests (a few hundred items, seconds to build). Only the data and the
weights are synthetic: the feature snapshots go through ``feast apply`` and ``feast
materialize`` into the profile's online store, the serving artifacts are built by
``served_model.bundle.write_artifacts`` and the model is logged, registered and aliased in MLflow.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from shopml import schema as S
from shopml.config import Settings
from shopml.privacy import Pseudonymizer

DS = date(2025, 12, 31)


@dataclass
class Deployment:
    """What was deployed, as the retailer knows it: raw user ids (what clients send); the
    features and the model hold their pseudonyms (``pseudonym``), as after ``land``."""

    version: str
    user_ids: list[str]
    item_ids: list[str]
    catalog: pd.DataFrame  # item_id, category
    purchases: pd.DataFrame  # user_id (raw), item_id, timestamp
    pseudonym: Pseudonymizer


def make_data(
    n_users: int, n_items: int, n_categories: int, per_user: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(catalog, purchases): Zipf-like item popularity, each user with favourites they rebuy."""
    rng = np.random.default_rng(seed)
    items = np.array([f"item-{j}" for j in range(n_items)], dtype=object)
    catalog = pd.DataFrame(
        {S.ITEM_ID: items, S.CATEGORY: [f"cat-{c}" for c in rng.integers(0, n_categories, n_items)]}
    )
    weights = 1.0 / (np.arange(n_items) + 10.0) ** 0.9
    draws = rng.choice(n_items, size=(n_users, per_user), p=weights / weights.sum())
    draws[:, per_user // 2 :] = draws[:, : per_user - per_user // 2]  # favourites, rebought
    users = np.repeat([f"user-{u}" for u in range(n_users)], per_user)
    seconds = rng.integers(0, 90 * 86_400, n_users * per_user)
    ts = pd.Timestamp(DS, tz="UTC") - pd.to_timedelta(seconds + 1, unit="s")
    purchases = pd.DataFrame({S.USER_ID: users, S.ITEM_ID: items[draws.ravel()], S.TIMESTAMP: ts})
    return catalog, purchases.drop_duplicates([S.USER_ID, S.ITEM_ID, S.TIMESTAMP])


def feature_snapshots(purchases: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One user and one item snapshot per entity, valid from the start of ``DS``, in the
    columns and types ``spark_jobs.features`` writes."""
    valid = pd.Timestamp(DS, tz="UTC")
    g = purchases.groupby(S.USER_ID)
    n, distinct = g.size(), g[S.ITEM_ID].nunique()
    users = pd.DataFrame(
        {
            S.USER_N_EVENTS: n,
            S.USER_N_PURCHASES: n,
            S.USER_N_BASKETS: np.maximum(n // 5, 1),
            S.USER_N_DISTINCT_ITEMS: distinct,
            S.USER_REORDER_RATE: (1 - distinct / n).astype("float32"),
            S.USER_AVG_BASKET_SIZE: (n / np.maximum(n // 5, 1)).astype("float32"),
            S.USER_DAYS_SINCE_PRIOR: np.float32(7.0),
        }
    ).reset_index()
    g = purchases.groupby(S.ITEM_ID)
    n, buyers = g.size(), g[S.USER_ID].nunique()
    items = pd.DataFrame(
        {
            S.ITEM_N_EVENTS: n,
            S.ITEM_N_PURCHASES: n,
            S.ITEM_N_USERS: buyers,
            S.ITEM_REORDER_RATE: (1 - buyers / n).astype("float32"),
            S.ITEM_PURCHASES_30D: n // 3,
        }
    ).reset_index()
    for frame in (users, items):
        frame[S.FEATURE_TIMESTAMP] = valid
    return users, items


def deploy(
    settings: Settings,
    n_users: int = 200,
    n_items: int = 500,
    n_categories: int = 5,
    per_user: int = 20,
    dim: int = 32,
    seed: int = 0,
    alias: str = "champion",
    ranker_format: str = "torch",
) -> Deployment:
    """Write features into Feast, build and register a servable version, point ``alias`` at it
    (its ranker a torch module, or its ONNX export with ``ranker_format="onnx"``, as the
    compression gate may choose)."""
    from shopml import feast_store

    catalog, purchases = make_data(n_users, n_items, n_categories, per_user, seed)
    pseudonym = Pseudonymizer.of(settings)
    user_snap, item_snap = feature_snapshots(pseudonymized(purchases, pseudonym))
    snapshot = settings.paths.features_for(DS)
    for name, frame in (("user", user_snap), ("item", item_snap)):
        (snapshot / name).mkdir(parents=True, exist_ok=True)
        frame.to_parquet(snapshot / name / "part-0.parquet", index=False)
    feast_store.apply(settings, DS)
    feast_store.materialize(settings, DS)

    version = register_version(settings, catalog, purchases, dim, seed, alias, ranker_format)
    user_ids = sorted(purchases[S.USER_ID].unique())
    return Deployment(version, user_ids, catalog[S.ITEM_ID].tolist(), catalog, purchases, pseudonym)


def pseudonymized(purchases: pd.DataFrame, pseudonym: Pseudonymizer) -> pd.DataFrame:
    """The purchases as ``land`` would write them: user ids replaced by their pseudonyms."""
    return purchases.assign(**{S.USER_ID: purchases[S.USER_ID].map(pseudonym)})


def register_version(
    settings: Settings,
    catalog: pd.DataFrame,
    purchases: pd.DataFrame,
    dim: int,
    seed: int,
    alias: str | None = "champion",
    ranker_format: str = "torch",
) -> str:
    """A randomly initialised two-tower and ranker over the data (raw user ids, pseudonymized
    here), registered with its serving artifacts; ``alias`` (when given) points at it.
    Returns the version."""
    from served_model.bundle import write_artifacts
    from served_model.ranker import Ranker
    from served_model.two_tower import TwoTower
    from training import registry
    from training.ranking import zoo_sources

    purchases = pseudonymized(purchases, Pseudonymizer.of(settings))
    torch.manual_seed(seed)
    popular = purchases[S.ITEM_ID].value_counts().index[:1000].tolist()
    users = sorted(purchases[S.USER_ID].unique())
    model = TwoTower(users, catalog[S.ITEM_ID].tolist(), popular, dim=dim).eval()
    ranker = Ranker().eval()
    if ranker_format == "onnx":
        from served_model.ranker import RANKER_FEATURES, OnnxRanker, ranker_params
        from training.compress import export_onnx

        example = np.random.default_rng(seed).random((8, len(RANKER_FEATURES)), np.float32)
        ranker = OnnxRanker(export_onnx(ranker, example), "onnx", ranker_params(ranker),
                            features=ranker.feature_names)  # fmt: skip
    elif ranker_format != "torch":
        raise ValueError(f"ranker_format: 'torch' or 'onnx', not {ranker_format!r}")
    fit = zoo_sources(settings, model)  # the nightly zoo tables, as a real version has them
    scores = fit(purchases) if fit is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        files = write_artifacts(Path(tmp), model, ranker, purchases, catalog, scores)
        run_id = registry.start_run(settings, DS.isoformat(), {"synthetic": True, "seed": seed})
        uri = registry.log_model(settings, run_id, model, "model", extra_files=files)
    version = registry.register(settings, uri, run_id)
    if alias:
        registry.set_alias(settings, alias, version)
    return version
