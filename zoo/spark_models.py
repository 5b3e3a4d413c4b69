"""Models fitted by Spark, the distributed engine the platform already runs.

* ``als``: Spark MLlib ``ALS`` with implicit preferences (Hu, Koren, Volinsky 2008); the
  factors are collected so scoring is one matrix product, like every other model.
* ``content_tfidf``: TF-IDF over item text (title, category, description) vectorised with
  Spark ML; a user's profile is the weighted sum of the vectors of the items they bought,
  items are ranked by cosine similarity to it. It is the only model that can rank an item
  nobody has bought yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from scipy import sparse

from mlkit.interactions import Interactions
from shopml import schema as S
from zoo.base import Base, check_positive, register, sparse_rows


def _spark():
    from shopml.config import load_settings
    from spark_jobs.session import get_spark

    return get_spark(load_settings().spark, "shopml-models")


@register
@dataclass
class ALS(Base):
    """Implicit-feedback matrix factorisation with Spark MLlib."""

    name: ClassVar[str] = "als"
    rank: int = 64
    reg: float = 0.05
    alpha: float = 10.0
    iterations: int = 15
    seed: int = 42
    repeat_weight: float = 0.0
    repeat_half_life_days: float | None = None

    def __post_init__(self) -> None:
        check_positive(rank=self.rank, iterations=self.iterations, alpha=self.alpha)

    def fit(self, data: Interactions) -> ALS:
        from pyspark.ml.recommendation import ALS as SparkALS

        self._fit_common(data)
        coo = self.train_matrix.tocoo()
        ratings = pd.DataFrame(
            {"u": coo.row.astype("int32"), "i": coo.col.astype("int32"), "r": coo.data}
        )
        spark = _spark()
        als = SparkALS(
            rank=self.rank,
            regParam=self.reg,
            alpha=self.alpha,
            maxIter=self.iterations,
            implicitPrefs=True,
            userCol="u",
            itemCol="i",
            ratingCol="r",
            seed=self.seed,
            coldStartStrategy="drop",
        )
        model = als.fit(spark.createDataFrame(ratings).repartition(2))
        self.user_factors = self._factors(model.userFactors, data.n_users)
        self.item_factors = self._factors(model.itemFactors, data.n_items)
        return self

    def _factors(self, df, n: int) -> np.ndarray:
        pdf = df.toPandas()
        out = np.zeros((n, self.rank), dtype=np.float32)
        out[pdf["id"].to_numpy()] = np.stack(pdf["features"].to_numpy()).astype(np.float32)
        return out

    def score(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users)
        u = np.zeros((len(users), self.rank), dtype=np.float32)
        known = users < len(self.user_factors)
        u[known] = self.user_factors[users[known]]
        return self._finish(np.maximum(u @ self.item_factors.T, 0.0), users)


def item_text(catalog: pd.DataFrame) -> pd.Series:
    """One document per item: title, category and description, whichever exist."""
    parts = [catalog[c].fillna("") for c in (S.TITLE, S.CATEGORY, S.TEXT) if c in catalog]
    if not parts:
        raise ValueError("content_tfidf needs item text: the catalog has no title/category/text")
    text = parts[0].astype(str)
    for p in parts[1:]:
        text = text + " " + p.astype(str)
    return text


def tfidf_vectors(texts: pd.Series, min_df: int = 2) -> sparse.csr_matrix:
    """L2-normalised TF-IDF rows, one per text, computed with Spark ML."""
    from pyspark.ml import Pipeline
    from pyspark.ml.feature import (
        IDF,
        CountVectorizer,
        Normalizer,
        RegexTokenizer,
        StopWordsRemover,
    )

    spark = _spark()
    df = spark.createDataFrame(
        pd.DataFrame({"row": np.arange(len(texts), dtype="int64"), "text": texts.to_numpy()})
    )
    pipe = Pipeline(
        stages=[
            RegexTokenizer(
                inputCol="text", outputCol="tokens", pattern=r"[^\w]+", minTokenLength=2
            ),
            StopWordsRemover(inputCol="tokens", outputCol="words"),
            CountVectorizer(inputCol="words", outputCol="tf", minDF=min_df),
            IDF(inputCol="tf", outputCol="idf"),
            Normalizer(inputCol="idf", outputCol="vec", p=2.0),
        ]
    )
    fitted = pipe.fit(df)
    vocab = len(fitted.stages[2].vocabulary)
    rows = fitted.transform(df).select("row", "vec").toPandas()
    indptr, indices, values = [0], [], []
    for vec in rows.sort_values("row")["vec"]:
        indices.append(vec.indices)
        values.append(vec.values)
        indptr.append(indptr[-1] + len(vec.indices))
    return sparse.csr_matrix(
        (
            np.concatenate(values) if values else [],
            np.concatenate(indices) if indices else [],
            indptr,
        ),
        shape=(len(rows), max(vocab, 1)),
        dtype=np.float32,
    )


@register
@dataclass
class ContentTFIDF(Base):
    """Cosine between a user's TF-IDF profile and each item's TF-IDF vector."""

    name: ClassVar[str] = "content_tfidf"
    min_df: int = 2
    repeat_weight: float = 0.0
    repeat_half_life_days: float | None = None

    def fit(self, data: Interactions) -> ContentTFIDF:
        if data.items is None:
            raise ValueError("content_tfidf needs the item catalog (Interactions.items)")
        self._fit_common(data)
        self.item_vecs = tfidf_vectors(item_text(data.items), self.min_df)
        x = self.train_matrix.copy()
        x.data = np.log1p(x.data)
        self.x = x
        return self

    def score(self, users: np.ndarray) -> np.ndarray:
        profile = sparse_rows(self.x, users) @ self.item_vecs
        norms = np.sqrt(np.asarray(profile.multiply(profile).sum(axis=1)).ravel())
        profile = sparse.diags(1.0 / np.maximum(norms, 1e-9)) @ profile
        return self._finish((profile @ self.item_vecs.T).toarray(), users)
