"""The two-tower implicit-feedback recommender.

User tower: a user-id embedding plus an MLP over the user's Feast features (point-in-time at
training, online at serving). Item tower: an item-id embedding and a popularity bias. The
score of (user, item) is their dot product plus the bias, so one matrix product ranks the
whole catalog. The vocabularies travel inside the module, so a model loaded from MLflow can
answer by raw ids with no side files.

With ``sparse=True`` the embedding tables have sparse gradients: a training step touches
only its batch's rows (``mlkit.loop.LazyAdam``), so its cost does not grow with the
vocabularies (the nightly pipeline's default, ``train.sparse_embeddings``).
"""

from __future__ import annotations

import torch
from torch import nn

from shopml import schema as S

# Count-like features are log-scaled; rates are already in [0, 1].
_LOG_SCALED = {
    S.USER_N_EVENTS,
    S.USER_N_PURCHASES,
    S.USER_N_BASKETS,
    S.USER_N_DISTINCT_ITEMS,
    S.USER_AVG_BASKET_SIZE,
    S.USER_DAYS_SINCE_PRIOR,
}
UNKNOWN_USER = 0  # embedding row shared by users unseen at training time


def log_scale(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Signed ``log1p`` of the columns in ``mask`` (counts), the others (rates) as they are."""
    logged = torch.sign(features) * torch.log1p(features.abs())
    return torch.where(mask, logged, features)


class TwoTower(nn.Module):
    def __init__(
        self,
        user_ids: list[str],
        item_ids: list[str],
        popular_items: list[str],
        feature_names: tuple[str, ...] = S.USER_FEATURES,
        dim: int = 64,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.user_index = {u: i + 1 for i, u in enumerate(user_ids)}  # 0 = unknown
        self.item_ids = list(item_ids)
        self.popular_items = list(popular_items)  # fallback for unknown users
        self.feature_names = tuple(feature_names)
        self.user_emb = nn.Embedding(len(user_ids) + 1, dim, sparse=sparse)
        # no features (the zoo fits it on interactions alone): id embeddings only
        self.user_mlp = (
            nn.Sequential(nn.Linear(len(feature_names), dim), nn.ReLU(), nn.Linear(dim, dim))
            if feature_names
            else None
        )
        self.item_emb = nn.Embedding(len(item_ids), dim, sparse=sparse)
        self.item_bias = nn.Embedding(len(item_ids), 1, sparse=sparse)
        self.register_buffer(
            "_log_mask",
            torch.tensor([f in _LOG_SCALED for f in feature_names], dtype=torch.bool),
            persistent=False,
        )
        nn.init.normal_(self.user_emb.weight, std=0.05)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        nn.init.zeros_(self.item_bias.weight)

    # --- towers -----------------------------------------------------------------------------
    def scale(self, features: torch.Tensor) -> torch.Tensor:
        """Raw feature values (as Feast returns them) to model inputs."""
        return log_scale(features, self._log_mask)

    def user_vector(self, user_idx: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.user_mlp is None:
            return self.user_emb(user_idx)
        return self.user_emb(user_idx) + self.user_mlp(self.scale(features))

    def item_vectors(
        self, item_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and biases of ``item_idx`` (the whole catalog when None)."""
        if item_idx is None:
            item_idx = torch.arange(len(self.item_ids))
        return self.item_emb(item_idx), self.item_bias(item_idx).squeeze(-1)

    def forward(self, user_idx: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item for each user: shape (batch, n_items)."""
        items, bias = self.item_vectors()
        return self.user_vector(user_idx, features) @ items.T + bias

    # --- by raw ids (serving) -----------------------------------------------------------------
    def user_indices(self, user_ids: list[str]) -> torch.Tensor:
        return torch.tensor([self.user_index.get(u, UNKNOWN_USER) for u in user_ids])

    def features_tensor(self, rows: list[dict[str, float | None]]) -> torch.Tensor:
        """Feature dicts to a tensor; a missing value (no snapshot yet) becomes 0."""
        return torch.tensor(
            [[float(r.get(f) or 0.0) for f in self.feature_names] for r in rows],
            dtype=torch.float32,
        )

    @torch.no_grad()
    def recommend(
        self, user_ids: list[str], feature_rows: list[dict[str, float | None]], k: int
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` (item id, score) per user. Callers route unknown users to the fallback."""
        scores = self(self.user_indices(user_ids), self.features_tensor(feature_rows))
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return [
            [(self.item_ids[i], float(s)) for s, i in zip(vals.tolist(), idx.tolist(), strict=True)]
            for vals, idx in zip(top.values, top.indices, strict=True)
        ]


def sampled_softmax_loss(
    model: TwoTower,
    user_idx: torch.Tensor,
    features: torch.Tensor,
    pos_items: torch.Tensor,
    n_negatives: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Softmax over the positive and ``n_negatives`` uniformly sampled items shared by the batch.

    Uniform sampling has a constant proposal probability, so the logQ correction cancels.
    Sampled items that equal the row's positive are masked out (no "accidental hits").
    """
    users = model.user_vector(user_idx, features)
    pos_vec, pos_bias = model.item_vectors(pos_items)
    neg_items = torch.randint(len(model.item_ids), (n_negatives,), generator=generator)
    neg_vec, neg_bias = model.item_vectors(neg_items)
    pos_logit = (users * pos_vec).sum(-1, keepdim=True) + pos_bias.unsqueeze(-1)
    neg_logit = users @ neg_vec.T + neg_bias
    neg_logit = neg_logit.masked_fill(
        neg_items.unsqueeze(0) == pos_items.unsqueeze(1), float("-inf")
    )
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return nn.functional.cross_entropy(logits, torch.zeros(len(users), dtype=torch.long))
