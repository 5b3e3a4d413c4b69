"""Why this item? The reasons ``?explain=true`` gives for each recommended item, in plain words.

Two kinds, both computed from what the engine already has for the request:

* **where it came from**: the candidate source that found it first (the engine's order of
  priority) with its evidence: "you bought it 4 times", "often bought with 24852, which you
  buy", "popular in dairy";
* **why it ranked there**: the ranker's strongest feature attributions for the item,
  captum's ``FeatureAblation`` against a baseline of the request's average candidate (each
  feature group of the item replaced by that average; the change of the ranker's logit is
  the group's effect). So an attribution answers "what sets this item above the other
  candidates", and it works for every ranker format (a perturbation method needs no
  gradients, so ONNX and int8 rankers explain too).

Cost: one batched ranker call of ``k × groups`` rows per request, only when asked
(``make bench-serving`` measures it, ``benchmarks/serving.py --explain``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from served_model.ranker import (
    DAYS_BEFORE_LATEST,
    FEATURE_GROUPS,
    NEVER_DAYS,
    PRIOR_PURCHASES,
    RANKER_FEATURES,
    features_of,
    ranker_logits,
)

TOP_ATTRIBUTIONS = 2  # the ranker's strongest reasons given per item
# Feature groups in the words a shopper reads (``served_model.ranker.FEATURE_GROUPS``).
GROUP_TEXT: dict[str, str] = {
    "feast": "your shopping habits and how often shoppers reorder it",
    "history": "how often and how recently you bought it",
    "item_knn": "it is often bought with items you buy",
    "two_tower": "it matches your taste",
    "user_knn": "shoppers with baskets like yours buy it",
    "ease": "it goes with what you usually buy",
}
SOURCE_TEXT: dict[str, str] = {
    "user_knn": "shoppers with baskets like yours buy it",
    "ease": "it goes with what you usually buy",
    "ann": "it matches your taste",
    "popular": "popular right now",
}
_GROUP_OF = np.array(
    [next(g for g, fs in FEATURE_GROUPS.items() if f in fs) for f in RANKER_FEATURES],
    dtype=object,
)


def _times(n: float) -> str:
    n = int(round(n))
    return "once" if n == 1 else f"{n} times"


def source_text(
    source: str,
    history: np.ndarray,
    seed_item: str | None = None,
    category: str | None = None,
) -> str:
    """The source's reason for one candidate; ``history`` is its row of
    ``HISTORY_FEATURES`` evidence (the engine's), ``seed_item`` the bought item whose
    co-purchase neighbour it is (item-kNN), ``category`` its category (popularity)."""
    from served_model.ranker import HISTORY_FEATURES

    prior = float(history[HISTORY_FEATURES.index(PRIOR_PURCHASES)])
    days = float(history[HISTORY_FEATURES.index(DAYS_BEFORE_LATEST)])
    if source == "history" or (prior > 0 and source not in ("item_knn",)):
        text = f"you bought it {_times(prior)}"
        if 0 < days < NEVER_DAYS:
            text += f", last {days:.0f} days before your latest order"
        elif days == 0:
            text += ", last in your latest order"
        return text
    if source == "item_knn":
        return f"often bought with {seed_item}, which you buy" if seed_item else \
            "often bought with items you buy"  # fmt: skip
    if source == "popular" and category:
        return f"popular in {category}"
    return SOURCE_TEXT.get(source, source)


def prepare() -> None:
    """Import the attribution library now: it takes seconds (matplotlib comes with it), and
    the first ``?explain=true`` must not stall the requests queued behind it."""
    import captum.attr  # noqa: F401


def attributions(ranker: Any, rows: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Each feature group's effect on the ranker's logit for each of ``rows`` (full-width
    ``RANKER_FEATURES`` rows): captum's ``FeatureAblation`` with the group's columns set
    to ``baseline``'s. Shape ``(len(rows), len(FEATURE_GROUPS))``; groups the ranker does not
    read are 0."""
    from captum.attr import FeatureAblation

    groups = list(FEATURE_GROUPS)
    mask = torch.tensor([groups.index(g) for g in _GROUP_OF])[None]  # columns -> group id

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(ranker_logits(ranker, x.numpy()))

    inputs = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    base = torch.from_numpy(np.ascontiguousarray(baseline, dtype=np.float32))[None]
    attr = FeatureAblation(forward).attribute(
        inputs, baselines=base, feature_mask=mask, perturbations_per_eval=len(groups)
    )
    per_column = attr.numpy()
    out = np.zeros((len(rows), len(groups)), dtype=np.float32)
    for g in range(len(groups)):  # every column of a group carries the group's effect
        cols = np.flatnonzero(mask[0].numpy() == g)
        out[:, g] = per_column[:, cols[0]]
    read = set(features_of(ranker))
    unread = [i for i, g in enumerate(groups) if not read & set(FEATURE_GROUPS[g])]
    out[:, unread] = 0.0
    return out


def ranker_reasons(effects: np.ndarray) -> list[dict[str, Any]]:
    """The strongest positive group effects of one item, in words (at most
    :data:`TOP_ATTRIBUTIONS`)."""
    groups = list(FEATURE_GROUPS)
    order = np.argsort(-effects, kind="stable")[:TOP_ATTRIBUTIONS]
    return [
        {
            "kind": "ranker",
            "group": groups[i],
            "effect": round(float(effects[i]), 4),
            "text": GROUP_TEXT[groups[i]],
        }  # fmt: skip
        for i in order
        if effects[i] > 0
    ]
