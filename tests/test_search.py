"""Product search, stage by stage on tiny data: the query derivation, the engine's query path
(normalisation, typo tolerance, fusion, facets, zero results, degradation, personalization),
graded metrics, the Spark derivation and the GX stop on corrupted pairs."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from served_model import search as sv

DS = date(2025, 12, 31)


# --- the derivation rule ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("title", "intent"),
    [
        ("Love it!", False),
        ("Beautiful", False),
        ("Nope", False),
        ("So so soft and very pretty", True),  # "soft" is not a sentiment word
        ("Funky fun flares", True),
        ("Great little jacket", True),
        (None, False),
    ],
)
def test_a_title_is_a_query_only_with_a_content_word(title, intent):
    from spark_jobs.search_data import content_words

    assert bool(content_words(title)) is intent


# --- the engine on a tiny catalog (BM25 only: no model weights needed) -------------------------
def tiny_products() -> pd.DataFrame:
    rows = [
        ("1", "Dresses", "red floral summer dress with pockets", 50),
        ("2", "Dresses", "black evening dress, elegant and long", 20),
        ("3", "Jeans", "blue skinny jeans, stretchy denim", 40),
        ("4", "Jeans", "black bootcut jeans", 5),
        ("5", "Sweaters", "warm wool sweater, cozy cardigan", 30),
        ("6", "Jackets", "denim jacket, blue and cropped", 10),
    ]
    frame = pd.DataFrame(rows, columns=[sv.ITEM_ID, sv.CATEGORY, sv.TEXT, sv.POPULARITY])
    frame[sv.SHORT_TEXT] = frame[sv.CATEGORY] + ": " + frame[sv.TEXT]
    frame[sv.DEPARTMENT] = frame[sv.CATEGORY]
    return frame


@pytest.fixture(scope="module")
def engine() -> sv.SearchEngine:
    products = tiny_products()
    bundle = sv.SearchBundle(
        products=products,
        lexical=sv.Lexical.build(products[sv.TEXT].tolist()),
        config=sv.QueryConfig(candidates=10, rerank_depth=5),
    )
    return sv.SearchEngine(bundle)


def test_normalisation_folds_case_unicode_and_punctuation():
    assert sv.normalize("  Robe d'ÉTÉ!!  Ｊｅａｎｓ ") == "robe d ete jeans"


def test_typos_are_corrected_to_the_most_frequent_catalog_word(engine):
    result = engine.search("blue jaens", k=3)
    assert result.corrected == {"jaens": "jeans"}
    assert result.items[0][0] == "3"  # blue + jeans


def test_bundle_without_models_degrades_to_bm25_and_says_so(engine):
    result = engine.search("black dress", k=3)
    assert [i for i, _ in result.items][:1] == ["2"]
    assert result.fallback == "dense_unavailable,reranker_unavailable"


def test_facets_count_the_candidates_and_the_category_filter_applies_after(engine):
    result = engine.search("black", k=10)
    assert result.facets == {"Dresses": 1, "Jeans": 1}
    filtered = engine.search("black", k=10, category="jeans")
    assert [i for i, _ in filtered.items] == ["4"]
    assert filtered.facets == result.facets  # facets describe the query, not the filter


def test_zero_results_relax_the_query_then_fall_back_to_the_named_category(engine):
    relaxed = engine.search("sweatshirts", k=3)  # no such word; its prefix is a catalog word
    assert "relaxed_query" in relaxed.fallback and relaxed.items[0][0] == "5"
    partial = engine.search("zzzz jeans qqqq xxxxx", k=2)  # one known word is a match
    assert {i for i, _ in partial.items} == {"3", "4"}
    assert "relaxed_query" not in partial.fallback and "popular" not in partial.fallback
    nothing = engine.search("qwxz vbnm", k=2)
    assert nothing.fallback.endswith("popular_in_category")
    assert [i for i, _ in nothing.items] == ["1", "3"]  # the most popular products


def test_popularity_prior_breaks_ties_toward_popular_products(engine):
    plain = engine.search("black", k=2, config=engine.config.__class__(pop_weight=0.0))
    prior = engine.search("black", k=2, config=engine.config.__class__(pop_weight=2.0))
    assert prior.items[0][0] == "2"  # 20 reviews against 5
    assert {i for i, _ in plain.items} == {"2", "4"}


def test_a_known_users_category_affinity_reorders_an_ambiguous_query(engine):
    """Personalization on synthetic data: the same query, two users, two first answers."""
    plain = engine.search("black", k=2)
    assert plain.items[0][0] == "4"  # the black jeans: the shorter text
    dress_buyer = engine.affinity({"1": 4.0, "2": 1.0, "unknown-item": 7.0})
    assert dress_buyer == {"Dresses": 1.0}
    personal = engine.search("black", k=2, user_affinity=dress_buyer)
    assert personal.items[0][0] == "2"  # the black dress
    assert engine.affinity({"unknown-item": 3.0}) == {}


def test_a_saved_bundle_loads_back_and_answers_the_same(engine, tmp_path):
    engine.bundle.save(tmp_path / "b")
    again = sv.SearchEngine(sv.SearchBundle.load(tmp_path / "b"))
    assert again.search("blue denim", k=4).items == engine.search("blue denim", k=4).items


# --- graded metrics ---------------------------------------------------------------------------
def test_graded_ndcg_mrr_and_recall_by_hand():
    from mlkit.metrics import graded_per_query

    grades = {"q": {"a": 2, "b": 1, "c": 1}}
    frame = graded_per_query({"q": ["b", "x", "a"]}, grades, k=10, recall_k=2)
    dcg = 1 / np.log2(2) + 3 / np.log2(4)
    idcg = 3 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4)
    row = frame.iloc[0]
    assert row["ndcg_at_10"] == pytest.approx(dcg / idcg)
    assert row["mrr_at_10"] == pytest.approx(1 / 3)  # the grade-2 item at rank 3
    assert row["recall_at_2"] == 0.0  # "a" is third
    empty = graded_per_query({}, grades)
    assert empty.iloc[0]["ndcg_at_10"] == 0.0


# --- Spark derivation and validation on a slice of the real reviews ---------------------------
@pytest.fixture(scope="module")
def search_data(spark, tmp_path_factory):
    from shopml.config import load_settings
    from spark_jobs.search_data import build_search_data

    home = tmp_path_factory.mktemp("search")
    settings = load_settings(home=home, search={"max_products": 40, "hard_negatives": 2})
    counts = build_search_data(settings, DS, spark)
    return settings, counts


@pytest.mark.spark
def test_every_review_is_a_query_or_index_text_never_both(search_data):
    from spark_jobs.search_data import reviews_path

    settings, counts = search_data
    p = settings.paths
    corpus = pd.read_parquet(p.search_table_for("corpus", DS))
    queries = pd.read_parquet(p.search_table_for("queries", DS))
    pairs = pd.read_parquet(p.search_table_for("pairs", DS))
    indexed = {r for ids in corpus["index_review_ids"] for r in ids}
    asked = set(queries["review_id"])
    reviews = pd.read_parquet(reviews_path())
    in_slice = reviews["Clothing ID"].astype(str).isin(corpus["item_id"])
    assert len(corpus) == counts["products"] == 40
    assert not indexed & asked
    assert len(indexed) + len(asked) == int(in_slice.sum())  # every review kept, once
    assert queries.groupby("item_id").size().max() <= settings.search.max_queries_per_product
    assert set(pairs["query_id"]) <= set(queries.loc[queries["split"] == "train", "query_id"])
    disjoint = queries[queries["view"] == "disjoint"]
    assert set(disjoint["split"]) <= {"validation", "test"}
    positive = pairs[pairs["kind"] == "positive"].merge(queries, on="query_id")
    assert (positive["item_id_x"] == positive["item_id_y"]).all()


@pytest.mark.spark
def test_corrupted_pairs_stop_at_validation_with_the_reason(search_data):
    from validation.run import ValidationFailed
    from validation.search import validate_search

    settings, _ = search_data
    reports = validate_search(settings, DS)
    assert all(r.success for r in reports)
    pairs_path = settings.paths.search_table_for("pairs", DS)
    pairs = pd.read_parquet(pairs_path)
    bad = pd.concat([pairs, pairs.head(1)]).assign(label=lambda f: f["label"].where(f.index > 0, 5))
    for f in pairs_path.glob("*.parquet"):
        f.unlink()
    bad.to_parquet(pairs_path / "part-corrupted.parquet", index=False)
    with pytest.raises(ValidationFailed) as err:
        validate_search(settings, DS)
    message = str(err.value)
    assert "search_pairs" in message and "label" in message
    assert "expect_compound_columns_to_be_unique" in message
