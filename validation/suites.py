"""Expectation suites, declared once. Each suite is a function returning fresh expectations.

Raw-data expectations use ``mostly`` so a stray bad row (which cleaning quarantines) does
not stop the night. ``mostly`` over a year of events would let one corrupted day through, so
raw events are also judged per ``event_date`` partition: a profile table (one row per
partition: the share of null keys and unknown event types) must stay within the same
tolerance, and a partition that does not is named, quarantined and stops the run.
Feature expectations are strict: features are our own output, and any violation there is a
bug.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shopml import schema as S

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

RAW_MOSTLY = 0.99


def raw_events() -> list[Expectation]:
    import great_expectations.expectations as gxe

    exps: list[Expectation] = [gxe.ExpectColumnToExist(column=c) for c in S.EVENT_REQUIRED]
    exps += [
        gxe.ExpectColumnValuesToNotBeNull(column=c, mostly=RAW_MOSTLY) for c in S.EVENT_REQUIRED
    ]
    exps.append(
        gxe.ExpectColumnValuesToBeInSet(
            column=S.EVENT_TYPE, value_set=list(S.EVENT_TYPES), mostly=RAW_MOSTLY
        )
    )
    exps.append(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    return exps


def null_share_column(column: str) -> str:
    return f"{column}_null_share"


UNKNOWN_EVENT_TYPE_SHARE = "unknown_event_type_share"


def raw_event_partitions() -> list[Expectation]:
    """On the per-partition profile (validation.run.partition_profile): each share <= 1%."""
    import great_expectations as gx

    gxe = gx.expectations
    shares = [null_share_column(c) for c in S.EVENT_REQUIRED] + [UNKNOWN_EVENT_TYPE_SHARE]
    return [
        gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0.0, max_value=1.0 - RAW_MOSTLY)
        for c in shares
    ]


def raw_items() -> list[Expectation]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnToExist(column=S.ITEM_ID),
        gxe.ExpectColumnValuesToNotBeNull(column=S.ITEM_ID, mostly=RAW_MOSTLY),
        gxe.ExpectColumnValuesToBeUnique(column=S.ITEM_ID, mostly=RAW_MOSTLY),
        gxe.ExpectColumnValuesToBeBetween(column=S.PRICE, min_value=0, mostly=RAW_MOSTLY),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]


def _feature_table(key: str, counts: tuple[str, ...], rates: tuple[str, ...]) -> list[Expectation]:
    import great_expectations.expectations as gxe

    exps: list[Expectation] = [
        gxe.ExpectColumnValuesToNotBeNull(column=c)
        for c in (key, S.FEATURE_TIMESTAMP, *counts, *rates)
    ]
    exps.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=[key, S.FEATURE_TIMESTAMP]))
    exps += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0) for c in counts]
    exps += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=1) for c in rates]
    exps.append(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    return exps


def user_features() -> list[Expectation]:
    counts = (S.USER_N_EVENTS, S.USER_N_PURCHASES, S.USER_N_BASKETS, S.USER_N_DISTINCT_ITEMS)
    return _feature_table(S.USER_ID, counts, (S.USER_REORDER_RATE,))


def item_features() -> list[Expectation]:
    counts = (S.ITEM_N_EVENTS, S.ITEM_N_PURCHASES, S.ITEM_N_USERS, S.ITEM_PURCHASES_30D)
    return _feature_table(S.ITEM_ID, counts, (S.ITEM_REORDER_RATE,))
