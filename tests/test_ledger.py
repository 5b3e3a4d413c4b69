"""The promotion ledger: append-only, readable, undoable, and alias moves serialised."""

from __future__ import annotations

import threading
import time

import pytest

from training import ledger, registry


@pytest.fixture
def versions(settings):
    """Three registry versions of the served model (sources need not be real models here)."""
    from mlflow import MlflowClient

    registry.use_tracking(settings)
    client = MlflowClient()
    client.create_registered_model(settings.model_name)
    for _ in range(3):
        client.create_model_version(settings.model_name, source="file:///nonexistent")
    return settings


def _gate(settings, before, after, promoted=True):
    registry.set_champion(settings, after)
    return ledger.record(settings, ledger.Entry(
        action="gate", model=settings.model_name, champion_before=before, champion_after=after,
        reason="test", ds="2025-12-31", challenger=after, promoted=promoted,
        metrics={"diff_vs_champion_ci_low": 0.01},
    ))  # fmt: skip


def test_entries_read_back_in_order_with_their_numbers(versions):
    _gate(versions, None, "1")
    _gate(versions, "1", "2")
    items = ledger.entries(versions)
    assert [(e.champion_before, e.champion_after) for e in items] == [(None, "1"), ("1", "2")]
    assert items[1].metrics == {"diff_vs_champion_ci_low": 0.01} and items[1].promoted
    assert items[1].actor and items[1].time and "ds=2025-12-31" in items[1].line()


def test_rollback_returns_to_the_previous_champion_and_is_recorded(versions):
    _gate(versions, None, "1")
    _gate(versions, "1", "3")
    entry = ledger.rollback(versions, reason="v3 hurts conversion")
    assert registry.champion_version(versions) == "1"
    assert (entry.action, entry.champion_before, entry.champion_after) == ("rollback", "3", "1")
    assert ledger.entries(versions)[-1].reason == "v3 hurts conversion"
    ledger.rollback(versions, to="2")
    assert registry.champion_version(versions) == "2"
    with pytest.raises(ValueError, match="does not exist"):
        ledger.rollback(versions, to="9")


def test_rollback_without_history_names_the_fix(versions):
    registry.set_champion(versions, "1")
    with pytest.raises(ValueError, match="--to VERSION"):
        ledger.rollback(versions)


def test_alias_moves_are_serialised(settings):
    """A second holder waits for the first: no read-decide-move can interleave."""
    order: list[str] = []

    def hold(name: str, seconds: float) -> None:
        with ledger.alias_lock(settings):
            order.append(f"{name}-in")
            time.sleep(seconds)
            order.append(f"{name}-out")

    first = threading.Thread(target=hold, args=("a", 0.5))
    first.start()
    time.sleep(0.1)
    hold("b", 0)
    first.join()
    assert order == ["a-in", "a-out", "b-in", "b-out"]
    with (
        ledger.alias_lock(settings),
        pytest.raises(TimeoutError, match="serialised"),
        ledger.alias_lock(settings, timeout=0.3),
    ):
        pass
