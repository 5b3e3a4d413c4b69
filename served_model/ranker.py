"""The served ranker's contract: DCN-v2 over exactly the features serving has per candidate.

Serving retrieves a few hundred candidates and ranks them with this model. Its inputs
(``RANKER_FEATURES``) are what the online path can read at request time:

* the user's Feast features and the candidate item's Feast features (online at serving,
  point-in-time from ``get_historical_features`` at training, so no row sees its future),
* how often the user bought the item before, and how many days before their latest purchase
  they last bought it (the reorder signals that dominate groceries; measured from the user's
  own latest purchase, not the clock, so serving a day after training reads them the same),
* the item's co-purchase (item-kNN) affinity to the user's most bought items.

:func:`ranker_inputs` is the one place a row is assembled, for training and serving alike.
How the ranker learns is ``training.ranking``; its compressed forms (``training.compress``)
keep the same contract (raw features in, one logit per row out), so the engine swaps them
freely: a torch module (fp32, a distilled student, dynamic int8) or an :class:`OnnxRanker`
(an ONNX export, fp32 or int8, run by ONNX Runtime).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from served_model.two_tower import log_scale
from shopml import schema as S

PRIOR_PURCHASES = "user_item_prior_purchases"
DAYS_BEFORE_LATEST = "user_item_days_before_latest"
KNN_AFFINITY = "user_item_knn_affinity"  # summed co-purchase cosine to the user's top items
HISTORY_FEATURES: tuple[str, ...] = (PRIOR_PURCHASES, DAYS_BEFORE_LATEST, KNN_AFFINITY)
NEVER_DAYS = 365.0  # DAYS_BEFORE_LATEST of an item the user never bought
RANKER_FEATURES: tuple[str, ...] = (
    *S.USER_FEATURES,
    *S.ITEM_FEATURES,
    *HISTORY_FEATURES,
)
_RATES = {S.USER_REORDER_RATE, S.ITEM_REORDER_RATE}


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
    """Click/purchase probability (as a logit) of candidate rows in ``RANKER_FEATURES`` order."""

    def __init__(self, cross_layers: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.feature_names = RANKER_FEATURES
        self.format = "torch"  # what serving reports (``ranker_info``); int8 copies say so
        self.net = DCNv2(len(RANKER_FEATURES), cross_layers, hidden, heads=1)
        self.register_buffer(
            "_log_mask",
            torch.tensor([f not in _RATES for f in RANKER_FEATURES], dtype=torch.bool),
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
    are 0, as in training.
    """
    n = len(item_features)
    user = np.broadcast_to(user_features, (n, len(S.USER_FEATURES)))
    x = np.concatenate(
        [user, item_features, history.reshape(n, len(HISTORY_FEATURES))], axis=1
    ).astype(np.float32)
    return np.nan_to_num(x, copy=False)


class OnnxRanker:
    """A ranker exported to ONNX and run by ONNX Runtime, with :class:`Ranker`'s contract:
    ``ranker(x)`` takes raw features (a tensor or array, ``(n, len(RANKER_FEATURES))``) and
    returns one logit per row as a tensor. ``eval()`` is a no-op, as for a torch module.

    ``threads`` is ONNX Runtime's intra-op pool of this session: 1 by default, since serving
    already answers several requests at once on its own threads (``serving.threads``).
    ``InferenceSession.run`` is thread-safe. Pickles as the model's bytes.
    """

    feature_names = RANKER_FEATURES

    def __init__(self, model: bytes, fmt: str = "onnx", params: int = 0, threads: int = 1) -> None:
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

    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_session", "_input")}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._open()

    def eval(self) -> OnnxRanker:
        return self

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        arr = x.numpy() if isinstance(x, torch.Tensor) else x
        out = self._session.run(None, {self._input: np.ascontiguousarray(arr, np.float32)})[0]
        return torch.from_numpy(out.reshape(-1))


def ranker_scores(ranker: nn.Module | OnnxRanker, x: np.ndarray) -> np.ndarray:
    """Probabilities (sigmoid of the logits) of rows ``x`` under any ranker format."""
    with torch.no_grad():
        return torch.sigmoid(ranker(torch.from_numpy(x))).numpy()


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
