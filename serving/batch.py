"""Batch scoring: the champion's top-k for every user it knows, for retailers who precompute.

The same two-stage engine as the HTTP service (same version, same candidates, same ranker and
online features), run over all users in chunks with one online read per chunk. Output:

* ``lake/recommendations/ds=YYYY-MM-DD/part-0.parquet``: one row per (user, rank) with item,
  score, model version and fallback reason (and, with ``explain``, the item's ``reasons``
  as JSON, the same as ``?explain=true`` gives); a rerun of the date replaces it;
* with ``to_online``: the lists, one row per user, written to Feast's online store
  (feature view ``user_recommendations``) and kept as ``lake/recommendations/latest``, the
  view's source.
"""

from __future__ import annotations

import json
import shutil
from datetime import date

import numpy as np
import pandas as pd

from shopml import schema as S
from shopml.config import Settings

RANK = "rank"
SCORE = "score"
MODEL_VERSION = "model_version"
FALLBACK = "fallback_reason"
REASONS = "reasons"  # JSON list of the item's reasons (explain)
ONLINE_VIEW = "user_recommendations"
CHUNK = 500


def score_users(engine, user_ids: list[str], k: int, explain: bool = False) -> pd.DataFrame:
    """Long table of the engine's top-``k`` per user (``explain``: with each item's reasons)."""
    rows = []
    for lo in range(0, len(user_ids), CHUNK):
        chunk = user_ids[lo : lo + CHUNK]
        answers = engine.recommend_many(chunk, k, explain=explain)
        for user, ranked in zip(chunk, answers, strict=True):
            for rank, (item, score) in enumerate(ranked.items, start=1):
                row = (user, rank, item, score, ranked.fallback)
                if explain:
                    row += (json.dumps(ranked.reasons[rank - 1]),)
                rows.append(row)
    columns = [S.USER_ID, RANK, S.ITEM_ID, SCORE, FALLBACK, *([REASONS] if explain else [])]
    out = pd.DataFrame(rows, columns=columns)
    out[MODEL_VERSION] = engine.version
    return out


def to_wide(top: pd.DataFrame, scored_at: pd.Timestamp) -> pd.DataFrame:
    """One row per user with the ranked lists, as the ``user_recommendations`` view holds them."""
    top = top.sort_values([S.USER_ID, RANK])
    g = top.groupby(S.USER_ID, sort=True)
    wide = pd.DataFrame(
        {
            "recommended_items": g[S.ITEM_ID].agg(list),
            "recommended_scores": g[SCORE].agg(lambda s: s.astype(np.float32).tolist()),
            MODEL_VERSION: g[MODEL_VERSION].first(),
        }
    ).reset_index()
    wide["scored_at"] = scored_at
    return wide


def batch_score(
    settings: Settings, ds: date, k: int = 100, to_online: bool = False, explain: bool = False
) -> dict:
    """Score every user of the champion; write the ``ds`` partition (and the online store)."""
    from serving.models import load_arm
    from training import registry

    version = registry.champion_version(settings)
    if version is None:
        raise RuntimeError(
            f"no 'champion' alias on model '{settings.model_name}': run the nightly pipeline "
            "(make demo) before batch scoring"
        )
    from shopml.privacy import forgotten

    engine = load_arm(settings, registry.CHAMPION, version).engine
    # a user forgotten since the champion was trained is still in its vocabulary: no list
    gone = forgotten(settings)
    users = [u for u in engine.model.user_index if u not in gone]
    top = score_users(engine, users, k, explain)

    out = settings.paths.recommendations_for(ds)
    shutil.rmtree(out, ignore_errors=True)  # a rerun replaces the partition
    out.mkdir(parents=True)
    top.to_parquet(out / "part-0.parquet", index=False)
    summary = {
        "model_version": version,
        "users": len(users),
        "forgotten_skipped": len(engine.model.user_index) - len(users),
        "rows": len(top),
        "fallbacks": int(top.drop_duplicates(S.USER_ID)[FALLBACK].notna().sum()),
        "path": str(out),
    }
    if to_online:
        from shopml.feast_store import open_store

        # The online store keeps a row only if it is newer than the one it holds (Redis),
        # so the lists are stamped with the time they were scored: a rerun of the date (a new
        # champion, say) replaces what is online.
        wide = to_wide(top, pd.Timestamp.now(tz="UTC"))
        latest = settings.paths.recommendations / "latest"
        shutil.rmtree(latest, ignore_errors=True)
        latest.mkdir(parents=True)
        wide.to_parquet(latest / "part-0.parquet", index=False)
        open_store(settings).write_to_online_store(ONLINE_VIEW, wide)
        summary["online_rows"] = len(wide)
    return summary
