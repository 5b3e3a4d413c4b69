"""Recommender-specific checks on raw events: what per-column expectations cannot see.

A bot that produces most of a day's events, a stuck clock that stamps every event with one
instant, a third of the events pointing at products missing from the catalog, a day with a
fraction (or a multiple) of the usual volume, features whose distribution jumped overnight:
every column is valid, yet a model trained on it learns the defect. These checks turn each
into a number per ``event_date`` (or per feature), judged by a GX suite with thresholds from
``settings.validation`` (:class:`shopml.config.ValidationConfig`), so a failure names the day,
quarantines it and stops the run like any other validation failure.

What a run measured is kept under ``lake/profiles/ds=<ds>/`` once it passes; the next run
compares its volumes and feature means with the newest earlier profile.
"""

from __future__ import annotations

import json
from datetime import date
from typing import TYPE_CHECKING

from shopml import schema as S
from shopml.config import Settings, ValidationConfig

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations.expectations import Expectation

TOP_USER_SHARE = "top_user_share"
TOP_ITEM_SHARE = "top_item_share"
TOP_TIMESTAMP_SHARE = "top_timestamp_share"
UNKNOWN_ITEM_SHARE = "unknown_item_share"
NEW_USER_SHARE = "new_user_share"
VOLUME_RATIO = "volume_ratio"
FEATURE_MEAN_CHANGE = "relative_mean_change"


def _top_share(events: pd.DataFrame, column: str, rows: pd.Series) -> pd.Series:
    counts = events.groupby([S.EVENT_DATE, column], dropna=True).size()
    return counts.groupby(level=0).max().reindex(rows.index) / rows


def event_profile(
    events: pd.DataFrame,
    items: pd.DataFrame,
    cfg: ValidationConfig,
    previous: dict | None = None,
) -> pd.DataFrame:
    """One row per ``event_date``: volume and the shares the suite judges (None where a day
    is too small or too early in the history to judge)."""
    import numpy as np
    import pandas as pd

    rows = events.groupby(S.EVENT_DATE).size()
    out = pd.DataFrame({"rows": rows})
    big = events.groupby(S.EVENT_DATE)[S.USER_ID].nunique() >= cfg.min_users
    for name, column in ((TOP_USER_SHARE, S.USER_ID), (TOP_ITEM_SHARE, S.ITEM_ID),
                         (TOP_TIMESTAMP_SHARE, S.TIMESTAMP)):  # fmt: skip
        out[name] = _top_share(events, column, rows).where(big)
    unknown = ~events[S.ITEM_ID].isin(set(items[S.ITEM_ID].dropna()))
    out[UNKNOWN_ITEM_SHARE] = unknown.groupby(events[S.EVENT_DATE]).mean()
    first_day = events.groupby(S.USER_ID)[S.EVENT_DATE].transform("min")
    new = (events[S.EVENT_DATE] == first_day).groupby(events[S.EVENT_DATE]).mean()
    days = sorted(rows.index)
    judged = set(days[cfg.history_days :])
    out[NEW_USER_SHARE] = new.where(big & rows.index.isin(judged))
    out[VOLUME_RATIO] = np.nan
    if previous and previous.get("median_rows"):
        newer = rows.index > previous["ds"]  # days the previous run had not seen
        out.loc[newer, VOLUME_RATIO] = rows[newer] / previous["median_rows"]
    return out.astype(float).rename_axis(S.EVENT_DATE).reset_index()


def event_suite(cfg: ValidationConfig) -> list[Expectation]:
    import great_expectations.expectations as gxe

    low, high = cfg.volume_ratio
    bounds = {
        TOP_USER_SHARE: (0.0, cfg.max_top_user_share),
        TOP_ITEM_SHARE: (0.0, cfg.max_top_item_share),
        TOP_TIMESTAMP_SHARE: (0.0, cfg.max_top_timestamp_share),
        UNKNOWN_ITEM_SHARE: (0.0, cfg.max_unknown_item_share),
        NEW_USER_SHARE: (0.0, cfg.max_new_user_share),
        VOLUME_RATIO: (low, high),
    }
    # null = not judged (a quiet or early day, or no previous run): GX skips nulls
    return [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=lo, max_value=hi)
            for c, (lo, hi) in bounds.items()]  # fmt: skip


def feature_drift(current: pd.DataFrame, previous: dict | None, table: str) -> pd.DataFrame:
    """One row per numeric feature: its mean now, the previous run's, the relative change."""
    import numpy as np
    import pandas as pd

    means = current.select_dtypes("number").mean()
    before = (previous or {}).get("feature_means", {}).get(table, {})
    rows = []
    for feature, mean in means.items():
        prev = before.get(feature)
        change = abs(mean - prev) / abs(prev) if prev not in (None, 0) else np.nan
        rows.append({"feature": feature, "mean": float(mean), "previous_mean": prev,
                     FEATURE_MEAN_CHANGE: change})  # fmt: skip
    return pd.DataFrame(rows)


def drift_suite(cfg: ValidationConfig) -> list[Expectation]:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeBetween(
            column=FEATURE_MEAN_CHANGE, min_value=0.0, max_value=cfg.max_feature_mean_change
        )
    ]


def previous_profile(settings: Settings, ds: date) -> dict | None:
    """The newest profile of an earlier date (a rerun of ``ds`` never compares with itself)."""
    root = settings.paths.profiles
    if not root.exists():
        return None
    earlier = sorted(p for p in root.glob("ds=*") if p.name[3:] < ds.isoformat())
    for folder in reversed(earlier):
        if (folder / "profile.json").exists():
            return json.loads((folder / "profile.json").read_text())
    return None


def save_profile(settings: Settings, ds: date, **parts: object) -> None:
    """Merge ``parts`` into the date's profile (raw events and features are saved apart)."""
    path = settings.paths.profile_for(ds) / "profile.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = json.loads(path.read_text()) if path.exists() else {"ds": ds.isoformat()}
    profile.update(parts)
    path.write_text(json.dumps(profile, indent=2, default=float))


LEAKED_EVENTS = "leaked_events"


def leakage(features: pd.DataFrame, events: pd.DataFrame, key: str, count: str) -> pd.DataFrame:
    """Point-in-time check of a feature table: each snapshot's event count (``count``) against
    the events that happened strictly before the snapshot's valid-from time. A positive
    ``leaked_events`` means the snapshot counted events from its own future (it would leak the
    label into training); a negative one means events went missing. Both must be 0."""
    import pandas as pd

    happened = pd.DataFrame({key: events[key].to_numpy(), "t": pd.to_datetime(
        events[S.TIMESTAMP], utc=True).to_numpy(), "event": 1})  # fmt: skip
    snapshots = pd.DataFrame({
        key: features[key].to_numpy(),
        "t": pd.to_datetime(features[S.FEATURE_TIMESTAMP], utc=True).to_numpy(),
        "event": 0, "row": range(len(features)),
    })  # fmt: skip
    both = pd.concat([happened, snapshots], ignore_index=True)
    # at equal times the snapshot sorts first: an event at exactly valid-from is not before it
    both = both.sort_values([key, "t", "event"], kind="stable")
    both["before"] = both.groupby(key)["event"].cumsum()
    seen = both[both["event"] == 0].set_index("row")["before"].sort_index()
    out = features[[key, S.FEATURE_TIMESTAMP]].copy()
    out[LEAKED_EVENTS] = features[count].to_numpy() - seen.to_numpy()
    return out


def leakage_suite() -> list[Expectation]:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeBetween(column=LEAKED_EVENTS, min_value=0, max_value=0)]
