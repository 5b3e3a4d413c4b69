"""The intraday update's windows and the nightly gate's word on its challenger (a registry of
stand-in versions; the whole update on real events is in tests/test_e2e.py)."""

from __future__ import annotations

from datetime import date, datetime

import pytest

from training import intraday, ledger, registry

UTC = intraday.UTC


@pytest.fixture
def versions(settings):
    """A registry where version N is created with the given tags (sources need not exist)."""
    from mlflow import MlflowClient

    registry.use_tracking(settings)
    client = MlflowClient()
    client.create_registered_model(settings.model_name)

    def make(**tags: str) -> str:
        mv = client.create_model_version(settings.model_name, source="file:///x", tags=tags)
        return str(mv.version)

    return settings, make


def test_windows_start_where_the_champions_data_ends(versions):
    settings, make = versions
    with pytest.raises(intraday.NoChampion, match="run nightly_retrain first"):
        intraday.plan(settings, datetime(2025, 12, 18, tzinfo=UTC))
    nightly = make(ds="2025-12-16")
    registry.set_champion(settings, nightly)
    w = intraday.plan(settings, datetime(2025, 12, 18, tzinfo=UTC))
    assert (w.champion, w.champion_ds) == (nightly, "2025-12-16")
    assert w.known_start == w.train_start == "2025-12-17T00:00:00+00:00"
    assert w.split == "2025-12-17T23:00:00+00:00" and w.until == "2025-12-18T00:00:00+00:00"
    # an intraday champion learnt up to its data end; its tables start after its nightly ds
    later = make(ds="2025-12-16", data_end="2025-12-17T20:00:00+00:00", warm_start_of=nightly)
    registry.set_champion(settings, later)
    w = intraday.plan(settings, "2025-12-18T00:00:00Z")
    assert w.known_start == "2025-12-17T00:00:00+00:00"
    assert w.train_start == "2025-12-17T20:00:00+00:00"
    # the judged hours leave nothing after the data end: nothing to learn, said so
    with pytest.raises(intraday.NothingToLearn, match="nothing is left after champion"):
        intraday.plan(settings, "2025-12-17T20:30:00Z")


def _settle(settings, promoted=None):
    with ledger.alias_lock(settings):
        return intraday.settle_challenger(settings, date(2025, 12, 17), promoted)


@pytest.mark.parametrize(
    ("gate", "stale", "nightly_promoted", "champion_after", "action"),
    [
        ("promote", False, False, "challenger", "gate"),  # the gate's word on its hours
        ("reject", False, False, "champion", "retire"),
        ("promote", True, False, "champion", "retire"),  # warm-started from an older champion
        ("promote", False, True, "nightly", "retire"),  # the nightly model supersedes it
    ],
)
def test_the_nightly_run_promotes_or_retires_the_challenger(
    versions, gate, stale, nightly_promoted, champion_after, action
):
    settings, make = versions
    old = make(ds="2025-12-15")
    champion = make(ds="2025-12-16")
    registry.set_champion(settings, champion)
    challenger = make(ds="2025-12-16", data_end="2025-12-17T12:00:00+00:00",
                      warm_start_of=old if stale else champion, intraday_gate=gate)  # fmt: skip
    registry.set_alias(settings, registry.CHALLENGER, challenger)
    nightly = make(ds="2025-12-17")
    if nightly_promoted:
        registry.set_champion(settings, nightly)
    reason = _settle(settings, nightly if nightly_promoted else None)
    expected = {"challenger": challenger, "champion": champion, "nightly": nightly}
    assert registry.champion_version(settings) == expected[champion_after]
    assert registry.alias_version(settings, registry.CHALLENGER) is None  # settled either way
    entry = ledger.entries(settings)[-1]
    assert (entry.action, entry.challenger, entry.reason) == (action, challenger, reason)
    assert entry.promoted == (champion_after == "challenger")
    assert _settle(settings) is None  # nothing left to settle


def test_a_challenger_set_by_hand_is_not_settled(versions):
    settings, make = versions
    registry.set_champion(settings, make(ds="2025-12-16"))
    registry.set_alias(settings, registry.CHALLENGER, make(ds="2025-12-16"))
    assert _settle(settings) is None
    assert registry.alias_version(settings, registry.CHALLENGER) == "2"


def test_only_purchases_of_known_users_and_items_are_learnt(settings, tmp_path):
    """The warm start counts what it cannot learn (no embedding to move) and refuses to train
    on fewer known purchases than ``intraday.min_examples``."""
    import pandas as pd

    from served_model.two_tower import TwoTower
    from shopml import schema as S

    champion = TwoTower(["u1", "u2"], ["a", "b"], ["a"], dim=4)
    purchases = pd.DataFrame({
        S.USER_ID: ["u1", "u2", "new", "u1"],
        S.ITEM_ID: ["a", "b", "a", "new"],
        S.TIMESTAMP: pd.Timestamp("2025-12-17 10:00", tz="UTC"),
        S.EVENT_TYPE: S.PURCHASE,
    })  # fmt: skip
    need = settings.model_copy(update={"intraday": settings.intraday.model_copy(
        update={"min_examples": 3})})  # fmt: skip
    with pytest.raises(intraday.NothingToLearn, match="2 purchases by known users") as err:
        intraday.warm_started(need, tmp_path, champion, purchases, "today")
    assert "'unknown_user_or_item': 2" in str(err.value)
