"""The served ranker's contract: DCN-v2 over exactly the features serving has per candidate.

Serving retrieves a few hundred candidates and ranks them with this model. Its inputs
(``RANKER_FEATURES``) are what the online path can read at request time:

* the user's Feast features and the candidate item's Feast features (online at serving,
  point-in-time from ``get_historical_features`` at training, so no row sees its future),
* how often the user bought the item before, and how many days before their latest purchase
  they last bought it (the reorder signals that dominate groceries; measured from the user's
  own latest purchase, not the clock, so serving a day after training reads them the same),
* the item's co-purchase (item-kNN) affinity to the user's most bought items,
* the two-tower's score of the (user, item) pair, and the scores of the zoo's strongest
  scorers (TIFU-style user-kNN, EASE), precomputed nightly per user as sparse top-N lists
  (``served_model.bundle.Tables.scores``): the ranker starts from what the best single
  models know, so it can only add to them.

Every ranker carries the names of the features it reads (``feature_names``, a subset of
``RANKER_FEATURES`` in that order): rows are always assembled at full width and
:func:`ranker_view` picks a ranker's columns. So a ranker trained without a feature group (an
ablation) and a champion registered before a feature existed (``LEGACY_FEATURES``) run in
the same engine.

:func:`ranker_inputs` is the one place a row is assembled, for training and serving alike.
How the ranker learns is ``training.ranking``; its compressed forms (``training.compress``)
keep the same contract (raw features in, one logit per row out), so the engine swaps them
freely: a torch module (fp32, a distilled student, dynamic int8) or an :class:`OnnxRanker`
(an ONNX export, fp32 or int8, run by ONNX Runtime).

An ONNX export holds the network after the log-scaling, and says so in its metadata
(:data:`LOG_SCALED_COLUMNS`): :class:`OnnxRanker` scales the raw rows in NumPy first
(:func:`log_scaled`): at serving's 200 rows those six operators (Sign, Abs, Add, Log, Mul,
Where) were most of a small ranker's time inside ONNX Runtime, and NumPy does the same in
less than half of it. A graph without that entry (exported before) scales inside and reads
raw rows, and runs as it did.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from served_model.two_tower import log_scale
from shopml import schema as S

PRIOR_PURCHASES = "user_item_prior_purchases"
DAYS_BEFORE_LATEST = "user_item_days_before_latest"
KNN_AFFINITY = "user_item_knn_affinity"  # summed co-purchase cosine to the user's top items
TWO_TOWER_SCORE = "user_item_two_tower_score"  # the two-tower's logit of the pair
# The zoo scorers precomputed per user (``Tables.scores``): source name -> its score feature.
ZOO_SOURCES: dict[str, str] = {
    "user_knn": "user_item_user_knn_score",  # TIFU-kNN: own decayed history + neighbours'
    "ease": "user_item_ease_score",  # EASE (Steck 2019), repeat-aware
}
HISTORY_FEATURES: tuple[str, ...] = (
    PRIOR_PURCHASES,
    DAYS_BEFORE_LATEST,
    KNN_AFFINITY,
    TWO_TOWER_SCORE,
    *ZOO_SOURCES.values(),
)
NEVER_DAYS = 365.0  # DAYS_BEFORE_LATEST of an item the user never bought
RANKER_FEATURES: tuple[str, ...] = (
    *S.USER_FEATURES,
    *S.ITEM_FEATURES,
    *HISTORY_FEATURES,
)
# What rankers of bundle formats 1-3 read (before the two-tower and zoo scores).
LEGACY_FEATURES: tuple[str, ...] = (
    *S.USER_FEATURES,
    *S.ITEM_FEATURES,
    PRIOR_PURCHASES,
    DAYS_BEFORE_LATEST,
    KNN_AFFINITY,
)
# Feature groups: what an ablation removes together (``benchmarks.served_ablation``).
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "feast": (*S.USER_FEATURES, *S.ITEM_FEATURES),
    "history": (PRIOR_PURCHASES, DAYS_BEFORE_LATEST),
    "item_knn": (KNN_AFFINITY,),
    "two_tower": (TWO_TOWER_SCORE,),
    **{name: (feature,) for name, feature in ZOO_SOURCES.items()},
}
_RATES = {S.USER_REORDER_RATE, S.ITEM_REORDER_RATE}
# ONNX metadata key of a graph that reads log-scaled rows: one "1" (log-scaled) or "0" per
# column of its input, comma-separated
LOG_SCALED_COLUMNS = "shopml.log_scaled_columns"


class DCNv2(nn.Module):
    """Cross network (full-rank, ``x_{l+1} = x_0 * (W x_l + b) + x_l``) beside a deep MLP."""

    def __init__(self, n_features: int, cross_layers: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(n_features)
        self.cross = nn.ModuleList(nn.Linear(n_features, n_features) for _ in range(cross_layers))
        self.deep = nn.Sequential(
            nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.Linear(n_features + hidden, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of each head: (batch, heads)."""
        x0 = self.norm(x)
        xl = x0
        for layer in self.cross:
            xl = x0 * layer(xl) + xl
        return self.heads(torch.cat([xl, self.deep(x0)], dim=1))


class Ranker(nn.Module):
    """Click/purchase probability (as a logit) of candidate rows in ``feature_names`` order
    (all of ``RANKER_FEATURES`` unless ``features`` names a subset)."""

    def __init__(
        self, cross_layers: int = 2, hidden: int = 64, features: tuple[str, ...] | None = None
    ) -> None:
        super().__init__()
        names = RANKER_FEATURES if features is None else tuple(features)
        unknown = sorted(set(names) - set(RANKER_FEATURES))
        if unknown or not names:
            raise ValueError(f"ranker features must be some of {RANKER_FEATURES}; got {unknown}")
        self.feature_names = tuple(f for f in RANKER_FEATURES if f in names)
        self.format = "torch"  # what serving reports (``ranker_info``); int8 copies say so
        self.net = DCNv2(len(self.feature_names), cross_layers, hidden, heads=1)
        self.register_buffer(
            "_log_mask",
            torch.tensor([f not in _RATES for f in self.feature_names], dtype=torch.bool),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw feature values in, one logit per row out."""
        return self.net(log_scale(x, self._log_mask)).squeeze(-1)


def ranker_inputs(
    user_features: np.ndarray, item_features: np.ndarray, history: np.ndarray
) -> np.ndarray:
    """The one place training and serving assemble a ranker row (raw values, float32).

    ``user_features`` is ``(n, len(USER_FEATURES))`` or one row broadcast to all candidates;
    ``history`` is ``(n, len(HISTORY_FEATURES))``. Missing values (a brand-new user or item)
    are 0, as in training. The row has every feature; :func:`ranker_view` picks a ranker's.
    """
    n, nu, ni = len(item_features), len(S.USER_FEATURES), len(S.ITEM_FEATURES)
    # one float32 buffer filled in place: at serving's 200 rows the concatenate-then-cast
    # it replaces took a fifth of the ranking stage of an ONNX ranker
    x = np.empty((n, len(RANKER_FEATURES)), dtype=np.float32)
    x[:, :nu] = user_features
    x[:, nu : nu + ni] = item_features
    x[:, nu + ni :] = history.reshape(n, len(HISTORY_FEATURES))
    if not np.isfinite(x).all():  # the check is a tenth of the cost of replacing
        np.nan_to_num(x, copy=False)
    return x


def log_scaled(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """NumPy twin of ``served_model.two_tower.log_scale`` (a new array): signed ``log1p`` of
    the columns in ``mask``, the others as they are."""
    out = np.array(x, dtype=np.float32, order="C")
    cols = out[:, mask]
    out[:, mask] = np.sign(cols) * np.log1p(np.abs(cols))
    return out


def features_of(ranker: object) -> tuple[str, ...]:
    """The features a ranker reads (``LEGACY_FEATURES`` for one pickled before it said)."""
    return tuple(getattr(ranker, "feature_names", LEGACY_FEATURES))


def ranker_view(ranker: object, x: np.ndarray) -> np.ndarray:
    """The columns of full-width rows ``x`` (``RANKER_FEATURES``) that ``ranker`` reads; rows
    already of its width pass as they are."""
    names = features_of(ranker)
    if x.shape[1] == len(names) and (len(names) != len(RANKER_FEATURES) or
                                     names == RANKER_FEATURES):  # fmt: skip
        return x
    if x.shape[1] != len(RANKER_FEATURES):
        raise ValueError(
            f"rows have {x.shape[1]} columns; expected {len(RANKER_FEATURES)} (RANKER_FEATURES) "
            f"or the ranker's {len(names)}"
        )
    return x[:, [RANKER_FEATURES.index(f) for f in names]]


class OnnxRanker:
    """A ranker exported to ONNX and run by ONNX Runtime, with :class:`Ranker`'s contract:
    ``ranker(x)`` takes raw features (a tensor or array, ``(n, len(RANKER_FEATURES))``) and
    returns one logit per row as a tensor. ``eval()`` is a no-op, as for a torch module.

    ``threads`` is ONNX Runtime's intra-op pool of this session: 1 by default, since serving
    already answers several requests at once on its own threads (``serving.threads``).
    ``InferenceSession.run`` is thread-safe. Pickles as the model's bytes. ``features`` are
    the columns the exported ranker reads (its torch original's ``feature_names``). A graph
    whose metadata names :data:`LOG_SCALED_COLUMNS` gets its rows scaled here (module doc).
    """

    def __init__(
        self,
        model: bytes,
        fmt: str = "onnx",
        params: int = 0,
        threads: int = 1,
        features: tuple[str, ...] = RANKER_FEATURES,
    ) -> None:
        self.feature_names = tuple(features)
        self.model_bytes = bytes(model)
        self.format = fmt
        self.params = int(params)
        self.threads = threads
        self._open()

    def _open(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(
            self.model_bytes, opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        scaled = self._session.get_modelmeta().custom_metadata_map.get(LOG_SCALED_COLUMNS)
        self._log_mask = None if scaled is None else np.array(scaled.split(",")) == "1"

    def __getstate__(self) -> dict[str, object]:
        return {
            k: v for k, v in self.__dict__.items() if k not in ("_session", "_input", "_log_mask")
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._open()

    def eval(self) -> OnnxRanker:
        return self

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        arr = x.numpy() if isinstance(x, torch.Tensor) else x
        return torch.from_numpy(self.logits(arr))

    def logits(self, x: np.ndarray) -> np.ndarray:
        """One logit per row of ``x`` (the ranker's columns), NumPy in and out: the serving
        path, which never touches torch for an ONNX ranker (a torch round trip per request
        cost as much as the model's own arithmetic at 200 candidates)."""
        x = (
            np.ascontiguousarray(x, np.float32)
            if self._log_mask is None
            else log_scaled(x, self._log_mask)
        )
        return self._session.run(None, {self._input: x})[0].reshape(-1)


def ranker_logits(ranker: nn.Module | OnnxRanker, x: np.ndarray) -> np.ndarray:
    """Logits of full-width rows ``x`` (or rows of the ranker's width) under any format."""
    if isinstance(ranker, OnnxRanker):
        return ranker.logits(ranker_view(ranker, x))
    with torch.inference_mode():
        return ranker(torch.from_numpy(np.ascontiguousarray(ranker_view(ranker, x)))).numpy()


def ranker_scores(ranker: nn.Module | OnnxRanker, x: np.ndarray) -> np.ndarray:
    """Probabilities (sigmoid of the logits) of rows ``x`` under any ranker format, computed
    in NumPy (``scipy.special.expit``: float32 stays float32, no overflow warning)."""
    return expit(ranker_logits(ranker, x))


def ranker_params(ranker: nn.Module | OnnxRanker) -> int:
    """Parameters of the ranker (for an int8 torch copy: those of its packed weights)."""
    if isinstance(ranker, OnnxRanker):
        return ranker.params
    count = sum(p.numel() for p in ranker.parameters())
    for m in ranker.modules():  # dynamic-int8 Linear keeps its weights outside parameters()
        if hasattr(m, "weight") and callable(m.weight) and hasattr(m, "bias"):
            w, b = m.weight(), m.bias()
            count += w.numel() + (b.numel() if b is not None else 0)
    return int(count)


def ranker_format(ranker: nn.Module | OnnxRanker) -> str:
    """``torch``, ``torch_int8``, ``onnx``, ``onnx_int8`` (what serving reports)."""
    return str(getattr(ranker, "format", "torch"))
