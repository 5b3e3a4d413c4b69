"""Great Expectations on the search pipeline's data: the corpus, the queries and the pairs.

Strict, like the feature suites: this data is our own output and trains a model that is
promoted automatically, so any violation stops the search DAG before training (the search
champion stays). One suite is about leakage: no held-out query's review may be part of any
product's searchable text, or the evaluation would grade the index on text it was given.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

from shopml import schema as S
from shopml.config import Settings
from validation.run import SuiteReport, _raise_on_failure, _read_parquet, _table, validate_frame

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

QUERY_LENGTH = "query_length"
IN_INDEX = "review_in_index"


def corpus_suite() -> list[Expectation]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column=S.ITEM_ID),
        gxe.ExpectColumnValuesToBeUnique(column=S.ITEM_ID),
        gxe.ExpectColumnValuesToNotBeNull(column="text"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="short_text", min_value=1),
        gxe.ExpectColumnValuesToNotBeNull(column=S.CATEGORY),
        gxe.ExpectColumnValuesToBeBetween(column="popularity", min_value=0),
    ]


def queries_suite(max_chars: int) -> list[Expectation]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="query_id"),
        gxe.ExpectColumnValuesToBeBetween(column=QUERY_LENGTH, min_value=1, max_value=max_chars),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(S.SEARCH_SPLITS)),
        gxe.ExpectColumnValuesToBeInSet(column="view", value_set=list(S.SEARCH_VIEWS)),
        # leakage: a held-out query's own review is in no product's searchable text
        gxe.ExpectColumnValuesToBeInSet(column=IN_INDEX, value_set=[False]),
    ]


def pairs_suite(max_chars: int, items: list[str]) -> list[Expectation]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column=QUERY_LENGTH, min_value=1, max_value=max_chars),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(S.SEARCH_GRADES)),
        gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=list(S.SEARCH_PAIR_KINDS)),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["query_id", S.ITEM_ID]),
        gxe.ExpectColumnValuesToBeInSet(column=S.ITEM_ID, value_set=items),
        # leakage: only training queries make pairs
        gxe.ExpectColumnValuesToBeInSet(column="query_split", value_set=["train"]),
    ]


def _with_length(frame: pd.DataFrame) -> pd.DataFrame:
    text = frame[S.QUERY].fillna("").str.strip()
    return frame.assign(**{QUERY_LENGTH: text.str.len()})


def validate_search(settings: Settings, ds: date) -> list[SuiteReport]:
    """The ``ds`` partitions of ``lake/search``; raises ``ValidationFailed`` on any failure."""
    paths = settings.paths
    where = {t: paths.search_table_for(t, ds) for t in ("corpus", "queries", "pairs")}
    corpus, queries, pairs = (_read_parquet(where[t]) for t in ("corpus", "queries", "pairs"))
    indexed = {r for ids in corpus["index_review_ids"] for r in ids}
    queries = _with_length(queries).assign(**{IN_INDEX: queries["review_id"].isin(indexed)})
    split_of = dict(zip(queries["query_id"], queries["split"], strict=True))
    pairs = _with_length(pairs).assign(query_split=pairs["query_id"].map(split_of).fillna("none"))
    max_chars = settings.search.max_query_chars
    items = corpus[S.ITEM_ID].astype(str).tolist()
    reports = [
        validate_frame(settings, "search_corpus", corpus_suite(),
                       corpus.drop(columns=["index_review_ids"]), ds=ds,
                       table=_table(settings, where["corpus"])),
        validate_frame(settings, "search_queries", queries_suite(max_chars), queries, ds=ds,
                       table=_table(settings, where["queries"])),
        validate_frame(settings, "search_pairs", pairs_suite(max_chars, items), pairs, ds=ds,
                       table=_table(settings, where["pairs"])),
    ]  # fmt: skip
    _raise_on_failure(settings, ds, reports)
    return reports
