"""The served ranker: a DCN-v2 over the features serving has for every candidate.

Serving retrieves a few hundred candidates (ANN over the two-tower's item embeddings, the
user's own purchases, item-kNN, popularity) and ranks them with this model. Its inputs are
exactly what the online path can read at request time:

* the user's Feast features and the candidate item's Feast features (online at serving,
  point-in-time from ``get_historical_features`` at training, so no row sees its future),
* the champion two-tower's score of the pair,
* how often the user bought the item before (the reorder signal that dominates groceries).

Training examples: every training purchase is a positive; each gets two negatives at the same
timestamp, one drawn uniformly from the catalog's purchased items and one from the user's own
history (items the user buys but did not buy then), so the ranker learns both "what sells"
and "which of my usual items now". Labels never come from the held-out baskets.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from shopml import schema as S
from shopml.config import Settings
from training.model import TwoTower
from training.recommenders.ranker import DCNv2

TWO_TOWER_SCORE = "two_tower_score"
PRIOR_PURCHASES = "user_item_prior_purchases"
RANKER_FEATURES: tuple[str, ...] = (
    *S.USER_FEATURES,
    *S.ITEM_FEATURES,
    TWO_TOWER_SCORE,
    PRIOR_PURCHASES,
)
_RATES = {S.USER_REORDER_RATE, S.ITEM_REORDER_RATE, TWO_TOWER_SCORE}
LABEL = "label"
EVENT_TS = "event_timestamp"


class Ranker(nn.Module):
    """Click/purchase probability (as a logit) of candidate rows in ``RANKER_FEATURES`` order."""

    def __init__(self, cross_layers: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.feature_names = RANKER_FEATURES
        self.net = DCNv2(len(RANKER_FEATURES), cross_layers, hidden, heads=1)
        self.register_buffer(
            "_log_mask",
            torch.tensor([f not in _RATES for f in RANKER_FEATURES], dtype=torch.bool),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw feature values in, one logit per row out."""
        logged = torch.sign(x) * torch.log1p(x.abs())
        return self.net(torch.where(self._log_mask, logged, x)).squeeze(-1)


def ranker_inputs(
    user_features: np.ndarray, item_features: np.ndarray, tt_score: np.ndarray, prior: np.ndarray
) -> np.ndarray:
    """The one place training and serving assemble a ranker row (raw values, float32).

    ``user_features`` is ``(n, len(USER_FEATURES))`` or one row broadcast to all candidates.
    Missing values (a brand-new user or item) are 0, as in training.
    """
    n = len(item_features)
    user = np.broadcast_to(user_features, (n, len(S.USER_FEATURES)))
    x = np.concatenate(
        [user, item_features, tt_score.reshape(n, 1), prior.reshape(n, 1)], axis=1
    ).astype(np.float32)
    return np.nan_to_num(x, copy=False)


def two_tower_pair_scores(
    model: TwoTower, users: list[str], user_features: np.ndarray, items: list[str]
) -> np.ndarray:
    """The two-tower's score of each (user, item) row, batched."""
    item_pos = {it: i for i, it in enumerate(model.item_ids)}
    idx = torch.tensor([item_pos[i] for i in items])
    out = []
    with torch.no_grad():
        for lo in range(0, len(users), 8192):
            sl = slice(lo, lo + 8192)
            u = model.user_vector(
                model.user_indices(users[sl]), torch.from_numpy(user_features[sl])
            )
            vec, bias = model.item_vectors(idx[sl])
            out.append(((u * vec).sum(-1) + bias).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def prior_purchases(history: pd.DataFrame, queries: pd.DataFrame) -> np.ndarray:
    """For each query row (user, item, ts): the user's purchases of the item strictly before ts.

    One sort of history and queries together; at equal timestamps queries sort first, so a
    purchase never counts itself.
    """
    cols = [S.USER_ID, S.ITEM_ID, EVENT_TS]
    h = history[cols].assign(_event=1, _row=-1)
    q = queries[cols].assign(_event=0, _row=np.arange(len(queries)))
    both = pd.concat([q, h], ignore_index=True)
    both[EVENT_TS] = pd.to_datetime(both[EVENT_TS], utc=True)
    both = both.sort_values([S.USER_ID, S.ITEM_ID, EVENT_TS, "_event"], kind="stable")
    before = both.groupby([S.USER_ID, S.ITEM_ID], sort=False)["_event"].cumsum()
    is_query = both["_event"].to_numpy() == 0
    out = np.zeros(len(queries), dtype=np.float32)
    out[both["_row"].to_numpy()[is_query]] = before.to_numpy()[is_query]
    return out


def sample_negatives(positives: pd.DataFrame, purchases: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Two negatives per positive at its timestamp: one uniform over the purchased items, one
    from the user's own history.

    Uniform, not popularity-proportional: serving ranks candidates that retrieval already
    picked (popular ones among them), so the ranker must learn that popular items *are* more
    likely; negatives drawn by popularity would teach it the opposite.
    """
    rng = np.random.default_rng(seed)
    popular = rng.choice(purchases[S.ITEM_ID].unique(), size=len(positives))
    own = purchases.groupby(S.USER_ID)[S.ITEM_ID].unique()
    user_items = own.reindex(positives[S.USER_ID]).to_numpy()
    draws = rng.random(len(positives))
    from_history = np.array(
        [items[int(d * len(items))] for items, d in zip(user_items, draws, strict=True)],
        dtype=object,
    )
    frames = [
        positives[[S.USER_ID, EVENT_TS]].assign(**{S.ITEM_ID: popular}),
        positives[[S.USER_ID, EVENT_TS]].assign(**{S.ITEM_ID: from_history}),
    ]
    neg = pd.concat(frames, ignore_index=True)
    key = [S.USER_ID, S.ITEM_ID, EVENT_TS]
    pos_pairs = set(positives[key].itertuples(index=False, name=None))
    keep = [p not in pos_pairs for p in neg[key].itertuples(index=False, name=None)]
    return neg[keep].reset_index(drop=True)


def fit_ranker(
    x: np.ndarray, y: np.ndarray, epochs: int, seed: int, batch_size: int = 2048, lr: float = 2e-3
) -> tuple[Ranker, list[float]]:
    """Binary cross-entropy on (features, label); returns the model and its loss curve."""
    torch.manual_seed(seed)
    ranker = Ranker()
    data = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
    opt = torch.optim.Adam(ranker.parameters(), lr=lr)
    curve = []
    for _ in range(epochs):
        ranker.train()
        total, n = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(ranker(xb), yb)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(xb), n + len(xb)
        curve.append(total / max(n, 1))
    return ranker.eval(), curve


def training_rows(settings: Settings, run_dir: Path, model: TwoTower, seed: int) -> pd.DataFrame:
    """Positives from ``train.parquet`` plus sampled negatives with point-in-time features."""
    from training.data import point_in_time_features

    positives = pd.read_parquet(run_dir / "train.parquet")
    events = pd.read_parquet(run_dir / "train_events.parquet")
    purchases = events[events[S.EVENT_TYPE] == S.PURCHASE].rename(columns={S.TIMESTAMP: EVENT_TS})
    negatives = sample_negatives(positives, purchases, seed)
    negatives = point_in_time_features(settings, negatives)
    rows = pd.concat(
        [positives.assign(**{LABEL: 1.0}), negatives.assign(**{LABEL: 0.0})], ignore_index=True
    )
    rows = rows[rows[S.ITEM_ID].isin(set(model.item_ids))].reset_index(drop=True)
    rows[PRIOR_PURCHASES] = prior_purchases(purchases, rows)
    user_x = rows[list(S.USER_FEATURES)].to_numpy(np.float32)
    rows[TWO_TOWER_SCORE] = two_tower_pair_scores(
        model, rows[S.USER_ID].tolist(), user_x, rows[S.ITEM_ID].tolist()
    )
    return rows


def train_ranker(settings: Settings, ds: date, epochs: int = 3) -> dict[str, object]:
    """DAG task: fit the ranker on the run's training purchases; writes ``ranker.pt``."""
    run_dir = settings.paths.run(ds)
    model = torch.load(run_dir / "model.pt", weights_only=False)
    rows = training_rows(settings, run_dir, model, settings.train.seed)
    x = ranker_inputs(
        rows[list(S.USER_FEATURES)].to_numpy(np.float32),
        rows[list(S.ITEM_FEATURES)].to_numpy(np.float32),
        rows[TWO_TOWER_SCORE].to_numpy(np.float32),
        rows[PRIOR_PURCHASES].to_numpy(np.float32),
    )
    y = rows[LABEL].to_numpy(np.float32)
    ranker, curve = fit_ranker(x, y, epochs, settings.train.seed)
    torch.save(ranker, run_dir / "ranker.pt")
    (run_dir / "ranker_loss.json").write_text(json.dumps(curve))
    return {"rows": len(rows), "positives": int(y.sum()), "loss": curve}
