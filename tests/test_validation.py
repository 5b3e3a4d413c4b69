"""Great Expectations suites: good data passes, corrupted data fails with a readable summary."""

import pandas as pd
import pytest

from shopml import schema as S
from validation import suites
from validation.run import site_dir, validate_frame


def _events(n=200, null_users_on=None):
    rows = []
    for i in range(n):
        day = f"2025-01-0{1 + i % 3}"
        rows.append(
            {
                S.USER_ID: None if day == null_users_on else f"u{i % 7}",
                S.ITEM_ID: f"i{i}",
                S.EVENT_TYPE: "purchase",
                S.TIMESTAMP: pd.Timestamp(day, tz="UTC"),
                S.EVENT_DATE: day,
            }
        )
    return pd.DataFrame(rows)


def test_clean_events_pass(settings):
    report = validate_frame(settings, "raw_events", suites.raw_events(), _events(), S.EVENT_DATE)
    assert report.success and not report.failures
    assert (site_dir(settings) / "index.html").exists()


def test_data_docs_name_the_date_and_table_and_load_nothing_remote(settings):
    """Run name = the logical date's run, asset = the lake table, every asset local."""
    import datetime

    ds = datetime.date(2025, 1, 3)
    table = "lake/raw/events/ds=2025-01-03"
    validate_frame(settings, "raw_events", suites.raw_events(), _events(), S.EVENT_DATE,
                   ds=ds, table=table)  # fmt: skip
    (page,) = (site_dir(settings) / "validations" / "raw_events" / "nightly-2025-01-03").rglob(
        "*.html"
    )
    html = page.read_text()
    assert f"Data asset: {table}" in html
    for site_page in (page, site_dir(settings) / "index.html"):
        text = site_page.read_text()
        assert "static/vendor/jquery@3.7.1/dist/jquery.min.js" in text
        for cdn in ("unpkg.com", "cdnjs.cloudflare.com", "jsdelivr.net", "bootstrapcdn.com",
                    "code.jquery.com", "amazonaws.com"):  # fmt: skip
            assert cdn not in text, (site_page, cdn)


def test_null_user_ids_fail_and_name_column_and_partition(settings):
    report = validate_frame(
        settings,
        "raw_events",
        suites.raw_events(),
        _events(null_users_on="2025-01-02"),
        S.EVENT_DATE,
    )
    assert not report.success
    assert report.bad_partitions == ["2025-01-02"]
    summary = report.summary()
    assert "expect_column_values_to_not_be_null on column 'user_id'" in summary
    assert "2025-01-02" in summary


def test_one_corrupted_day_in_a_long_history_is_caught_per_partition(settings):
    """0.3% null user ids overall passes ``mostly``; the day that holds them all does not."""
    from validation.run import partition_profile

    days = pd.date_range("2025-01-01", periods=300, freq="D", tz="UTC")
    events = pd.DataFrame(
        {
            S.USER_ID: [None if d.day == 5 and d.month == 3 else "u1" for d in days],
            S.ITEM_ID: "i1",
            S.EVENT_TYPE: "purchase",
            S.TIMESTAMP: days,
            S.EVENT_DATE: days.strftime("%Y-%m-%d"),
        }
    )
    whole = validate_frame(settings, "raw_events", suites.raw_events(), events, S.EVENT_DATE)
    assert whole.success  # 1 bad row in 300 is within mostly=0.99
    report = validate_frame(
        settings,
        "raw_event_partitions",
        suites.raw_event_partitions(),
        partition_profile(events),
        S.EVENT_DATE,
    )
    assert not report.success and report.bad_partitions == ["2025-03-05"]
    assert "on column 'user_id_null_share'" in report.summary()


def test_negative_prices_fail_items_suite(settings):
    items = pd.DataFrame(
        {
            S.ITEM_ID: [f"i{i}" for i in range(50)],
            S.PRICE: [-1.0 if i % 5 == 0 else 2.0 for i in range(50)],
        }
    )
    report = validate_frame(settings, "raw_items", suites.raw_items(), items)
    assert not report.success
    assert any(f["column"] == S.PRICE for f in report.failures)


@pytest.mark.parametrize("bad", [{S.USER_REORDER_RATE: 1.5}, {S.USER_N_EVENTS: -1}])
def test_feature_suite_is_strict(settings, bad):
    row = {
        S.USER_ID: "u",
        S.FEATURE_TIMESTAMP: pd.Timestamp("2025-01-02", tz="UTC"),
        **dict.fromkeys(S.USER_FEATURES, 1.0),
    }
    ok = pd.DataFrame([row, {**row, S.USER_ID: "v"}])
    assert validate_frame(settings, "user_features", suites.user_features(), ok).success
    broken = pd.DataFrame([row, {**row, S.USER_ID: "v", **bad}])
    assert not validate_frame(settings, "user_features", suites.user_features(), broken).success


def test_volume_and_feature_drift_are_judged_against_the_previous_run(settings):
    """Day-over-day: a new day at 20x the previous run's median day, and a feature whose mean
    tripled overnight, each fail their suite; the same data without a previous run passes."""
    import datetime

    from validation import behaviour

    cfg = settings.validation
    events = _events(n=300)
    items = pd.DataFrame({S.ITEM_ID: [f"i{i}" for i in range(300)]})
    previous = {"ds": "2025-01-02", "median_rows": 5.0}
    profile = behaviour.event_profile(events, items, cfg, previous)
    assert profile.loc[profile[S.EVENT_DATE] == "2025-01-03", behaviour.VOLUME_RATIO].item() == 20
    assert profile[behaviour.VOLUME_RATIO].isna().sum() == 2  # days the previous run had seen
    report = validate_frame(settings, "raw_event_behaviour", behaviour.event_suite(cfg),
                            profile, S.EVENT_DATE)  # fmt: skip
    assert not report.success and report.bad_partitions == ["2025-01-03"]
    fresh = behaviour.event_profile(events, items, cfg, None)
    assert validate_frame(
        settings, "raw_event_behaviour", behaviour.event_suite(cfg), fresh
    ).success

    features = pd.DataFrame({"n_events": [3.0, 6.0], "reorder_rate": [0.2, 0.4]})
    means = {"user_features": {"n_events": 1.5, "reorder_rate": 0.3}}
    behaviour.save_profile(settings, datetime.date(2025, 1, 1), feature_means=means)
    before = behaviour.previous_profile(settings, datetime.date(2025, 1, 2))
    assert behaviour.previous_profile(settings, datetime.date(2025, 1, 1)) is None  # not itself
    drift = behaviour.feature_drift(features, before, "user_features").set_index("feature")
    assert drift.loc["n_events", behaviour.FEATURE_MEAN_CHANGE] == pytest.approx(2.0)
    report = validate_frame(settings, "user_features_drift", behaviour.drift_suite(cfg),
                            drift.reset_index())  # fmt: skip
    assert not report.success


def test_a_feature_snapshot_that_counts_its_own_future_fails_point_in_time(settings):
    from validation import behaviour

    events = pd.DataFrame({
        S.USER_ID: ["a", "a", "a", "b"],
        S.TIMESTAMP: pd.to_datetime(["2025-01-01 10:00", "2025-01-02 09:00", "2025-01-02 23:59",
                                     "2025-01-02 00:00"], utc=True),
    })  # fmt: skip
    features = pd.DataFrame({
        S.USER_ID: ["a", "a", "b"],
        S.FEATURE_TIMESTAMP: pd.to_datetime(["2025-01-02", "2025-01-03", "2025-01-02"], utc=True),
        S.USER_N_EVENTS: [1, 3, 0],  # b's event at exactly midnight is not before valid-from
    })  # fmt: skip
    honest = behaviour.leakage(features, events, S.USER_ID, S.USER_N_EVENTS)
    assert honest[behaviour.LEAKED_EVENTS].tolist() == [0, 0, 0]
    leaky = features.assign(**{S.FEATURE_TIMESTAMP: features[S.FEATURE_TIMESTAMP]
                               - pd.Timedelta(days=1)})  # fmt: skip
    leaks = behaviour.leakage(leaky, events, S.USER_ID, S.USER_N_EVENTS)
    assert leaks[behaviour.LEAKED_EVENTS].tolist() == [1, 2, 0]
    report = validate_frame(settings, "user_features_point_in_time", behaviour.leakage_suite(),
                            leaks)  # fmt: skip
    assert not report.success and report.failures[0]["unexpected_count"] == 2
