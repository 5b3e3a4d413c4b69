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
    HISTORY_FEATURES,
    NEVER_DAYS,
    PRIOR_PURCHASES,
    RANKER_FEATURES,
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
_GROUPS = list(FEATURE_GROUPS)
# ``RANKER_FEATURES`` column -> its group's index (captum's feature mask), and one column of
# each group (every column of a group carries the group's effect)
_GROUP_OF = [next(i for i, g in enumerate(_GROUPS) if f in FEATURE_GROUPS[g])
             for f in RANKER_FEATURES]  # fmt: skip
_MASK = torch.tensor(_GROUP_OF)[None]
_FIRST_COLUMN = [_GROUP_OF.index(i) for i in range(len(_GROUPS))]


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
    co-purchase neighbour it is (item-kNN), ``category`` its category (popularity). A bought
    item found by another source than item-kNN is explained by the purchases themselves."""
    prior = float(history[HISTORY_FEATURES.index(PRIOR_PURCHASES)])
    days = float(history[HISTORY_FEATURES.index(DAYS_BEFORE_LATEST)])
    if source == "history" or (prior > 0 and source != "item_knn"):
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
    to ``baseline``'s. Shape ``(len(rows), len(FEATURE_GROUPS))``; a group the ranker does not
    read is 0 (``ranker_view`` drops its columns, so replacing them changes nothing)."""
    from captum.attr import FeatureAblation

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(ranker_logits(ranker, x.numpy()))

    inputs = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    base = torch.from_numpy(np.ascontiguousarray(baseline, dtype=np.float32))[None]
    attr = FeatureAblation(forward).attribute(
        inputs, baselines=base, feature_mask=_MASK, perturbations_per_eval=len(_GROUPS)
    )
    return attr.numpy()[:, _FIRST_COLUMN].astype(np.float32)


def ranker_reasons(effects: np.ndarray) -> list[dict[str, Any]]:
    """The strongest positive group effects of one item, in words (at most
    :data:`TOP_ATTRIBUTIONS`)."""
    order = np.argsort(-effects, kind="stable")[:TOP_ATTRIBUTIONS]
    return [
        {
            "kind": "ranker",
            "group": _GROUPS[i],
            "effect": round(float(effects[i]), 4),
            "text": GROUP_TEXT[_GROUPS[i]],
        }
        for i in order
        if effects[i] > 0
    ]
