import numpy as np
import pandas as pd
import pytest

from mlkit import metrics as M
from mlkit.interactions import from_events
from shopml import schema as S
from training import gate


def _frame(values, users=None):
    users = range(len(values)) if users is None else users
    return pd.DataFrame({"user_idx": list(users), "ndcg": values})


def test_margin_is_relative_to_the_reference_mean():
    # champion per user 0.1, 0.2, 0.3 (mean 0.2); challenger +0.01 for every user, so every
    # bootstrap mean of the difference is 0.01: CI [0.01, 0.01]
    champion = _frame([0.1, 0.2, 0.3])
    challenger = _frame([0.11, 0.21, 0.31])
    # margin 0.04: threshold 0.04 x 0.2 = 0.008 < 0.01 -> promote
    d = gate.decide(challenger, champion, margin=0.04, segments=(), n_boot=200)
    assert d.promote and d.reference == "champion"
    assert d.numbers["diff_vs_champion_ci_low"] == pytest.approx(0.01)
    assert d.numbers["threshold_vs_champion"] == pytest.approx(0.008)
    # margin 0.06: threshold 0.06 x 0.2 = 0.012 > 0.01 -> reject
    d = gate.decide(challenger, champion, margin=0.06, segments=(), n_boot=200)
    assert not d.promote
    assert "does not clear" in d.reasons[1] and d.reasons[0].startswith("REJECT")


def test_a_tie_never_promotes():
    same = _frame([0.3, 0.1, 0.7, 0.0])
    d = gate.decide(same, same, margin=0.0, segments=(), n_boot=100)
    assert not d.promote  # CI of a zero difference is [0, 0]: not strictly above 0


def test_noise_does_not_promote_and_a_real_gain_does():
    rng = np.random.default_rng(0)
    champion = rng.random(400)
    noisy = _frame(np.clip(champion + rng.normal(0, 0.2, 400), 0, 1))
    better = _frame(np.clip(champion + 0.05 + rng.normal(0, 0.05, 400), 0, 1))
    assert not gate.decide(noisy, _frame(champion), margin=0.01, segments=()).promote
    d = gate.decide(better, _frame(champion), margin=0.01, segments=())
    assert d.promote
    again = gate.decide(better, _frame(champion), margin=0.01, segments=())
    assert again == d  # seeded: the same decision and numbers


def _segmented(warm, cold):
    """20 users; users 0-4 are cold. Per-user NDCG ``warm`` / ``cold``."""
    values = [cold] * 5 + [warm] * 15
    frame = _frame(values)
    return {"all": frame, "cold": frame.iloc[:5]}


def test_a_regressing_protected_segment_rejects_with_the_reason():
    champion = _segmented(warm=0.5, cold=0.5)
    challenger = _segmented(warm=0.8, cold=0.4)
    # overall: mean difference (15 x 0.3 - 5 x 0.1) / 20 = 0.2, far above 0.01 x 0.5
    # cold: relative drop (0.5 - 0.4) / 0.5 = 20% > 5% tolerance -> reject
    d = gate.decide(challenger, champion, segments=("cold",), tolerance=0.05, n_boot=200)
    assert not d.promote
    assert any("segment 'cold' regresses" in r and "20.0%" in r for r in d.reasons)
    assert d.numbers["segment_cold_relative_drop"] == pytest.approx(0.2)
    # a 25% tolerance lets the same challenger through
    assert gate.decide(challenger, champion, segments=("cold",), tolerance=0.25).promote


def test_first_run_compares_with_the_baseline_and_both_bars_apply():
    baseline = _frame([0.2] * 10)
    champion = _frame([0.1] * 10)
    challenger = _frame([0.15] * 10)
    d = gate.decide(challenger, baseline=baseline, segments=())
    assert d.reference == "baseline" and not d.promote  # 0.15 < popularity's 0.2
    # beats the champion, but the champion itself is below popularity: still rejected
    d = gate.decide(challenger, champion, baseline, segments=())
    assert d.reference == "champion" and not d.promote
    assert d.numbers["diff_vs_champion_ci_low"] == pytest.approx(0.05)
    assert d.numbers["diff_vs_baseline_ci_high"] == pytest.approx(-0.05)


def _evaluation(score, seed=0, exclude_seen=False):
    rng = np.random.default_rng(seed)
    n = 3000
    ev = pd.DataFrame(
        {
            S.USER_ID: rng.integers(0, 150, n).astype(str),
            S.ITEM_ID: rng.zipf(1.5, n).clip(max=80).astype(str),
            S.EVENT_TYPE: S.PURCHASE,
            S.TIMESTAMP: pd.Timestamp("2025-01-01", tz="UTC"),
        }
    )
    data = from_events(ev)
    is_test = np.random.default_rng(1).random(n) < 0.25
    train, test = data.subset(~is_test), data.subset(is_test)
    return M.evaluate(score(train, test), train, test, k=10, exclude_seen=exclude_seen, n_boot=100)


def _popularity(train, test):
    pop = np.bincount(train.events["item_idx"], minlength=train.n_items).astype(np.float32)
    return lambda users: np.tile(pop, (len(users), 1))


def _oracle(train, test):
    truth = M.relevance_matrix(test, np.arange(test.n_users)).toarray().astype(np.float32)
    return lambda users: truth[users]  # knows the held-out items: better everywhere


def test_gate_on_evaluation_results_with_default_segments():
    pop, oracle = _evaluation(_popularity), _evaluation(_oracle)
    d = gate.decide(oracle, baseline=pop)
    assert d.promote, d.reasons
    assert {"segment_cold_users", "segment_heavy_users", "segment_long_tail_users"} <= set(
        d.numbers
    )
    assert not gate.decide(pop, champion=oracle).promote
    assert d.to_dict()["promote"] is True
    with pytest.raises(ValueError, match="different protocols"):
        gate.decide(oracle, baseline=_evaluation(_popularity, exclude_seen=True))


def test_gate_errors_are_readable():
    frame = _frame([0.1, 0.2])
    with pytest.raises(ValueError, match="nothing to compare with"):
        gate.decide(frame)
    with pytest.raises(ValueError, match="no user column 'user_idx'"):
        gate.decide(frame.rename(columns={"user_idx": "uid"}), frame, segments=())
    with pytest.raises(ValueError, match="no metric column 'recall'"):
        gate.decide(frame, frame, metric="recall", segments=())
    with pytest.raises(ValueError, match="different users"):
        gate.decide(frame, _frame([0.1, 0.2], users=[5, 6]), segments=())
    with pytest.raises(ValueError, match="protected segment 'cold' is missing"):
        gate.decide(frame, frame)
    with pytest.raises(ValueError, match="no users evaluated"):
        gate.decide(_frame([]), _frame([]), segments=())
    with pytest.raises(ValueError, match="margin must be"):
        gate.decide(frame, frame, margin=-0.1, segments=())


@pytest.mark.parametrize(
    ("name", "shift", "promotes"),
    [("worse", -0.05, False), ("equal", 0.0, False), ("better", 0.05, True)],
)
def test_only_a_better_challenger_replaces_the_champion(name, shift, promotes):
    """Worse, equal and better challengers against one champion on the same 300 users."""
    rng = np.random.default_rng(7)
    champion = rng.uniform(0.1, 0.9, 300)
    challenger = np.clip(champion + shift + rng.normal(0, 0.01, 300), 0, 1)
    baseline = _frame(champion * 0.2)
    d = gate.decide(_frame(challenger), _frame(champion), baseline, segments=(), n_boot=300)
    assert d.promote is promotes, (name, d.reasons)


def test_a_broken_challenger_never_promotes():
    """NaN metrics (a broken model or evaluation) are refused, not averaged away."""
    champion = _frame([0.3, 0.4, 0.5])
    broken = _frame([0.9, np.nan, 0.9])
    with pytest.raises(ValueError, match="NaN"):
        gate.decide(broken, champion, segments=())


def test_baseline_non_inferiority_promotes_a_tie_but_not_a_loss_and_not_against_a_champion():
    """Search's rule 5: the first version need only be no worse than the cheap peer."""
    baseline = _frame([0.2, 0.4, 0.6])  # mean 0.4
    tie = gate.decide(baseline, baseline=baseline, segments=(), n_boot=100,
                      baseline_non_inferiority=0.05)  # fmt: skip
    assert tie.promote and tie.numbers["threshold_vs_baseline"] == pytest.approx(-0.02)
    worse = _frame([0.17, 0.37, 0.57])  # -0.03 for everyone: beyond -0.05 x 0.4
    assert not gate.decide(worse, baseline=baseline, segments=(), n_boot=100,
                           baseline_non_inferiority=0.05).promote  # fmt: skip
    # against a champion the challenger must still be better (superiority)
    assert not gate.decide(baseline, champion=baseline, baseline=baseline, segments=(),
                           n_boot=100, baseline_non_inferiority=0.05).promote  # fmt: skip


def _cand(name, ndcg, p50):
    return {"name": name, "val_ndcg": ndcg, "p50_ms": p50}


def test_compression_gate_refuses_fast_but_worse_and_picks_fastest_within_tolerance():
    cands = [
        _cand("teacher", 0.400, 4.0),
        _cand("int8", 0.398, 2.0),  # -0.5%: within 1%
        _cand("student", 0.380, 1.0),  # -5%: fastest but worse
        _cand("onnx", 0.400, 2.5),
    ]
    c = gate.choose_compressed(cands, "teacher", "val_ndcg", 0.01)
    assert c.chosen == "int8"
    assert "beyond 1% tolerance" in c.reasons["student"] and "-5.0%" in c.reasons["student"]
    assert c.reasons["onnx"].startswith("slower than int8")
    assert c.reasons["teacher"].startswith("slower than int8")
    assert set(c.reasons) == {"teacher", "student", "onnx"}
    assert c.to_dict()["chosen"] == "int8"
    # a wider tolerance lets the student through
    assert gate.choose_compressed(cands, "teacher", "val_ndcg", 0.06).chosen == "student"


def test_compression_gate_chooses_the_teacher_when_nothing_qualifies():
    cands = [_cand("teacher", 0.5, 3.0), _cand("a", 0.4, 1.0), _cand("b", 0.49, 2.9)]
    c = gate.choose_compressed(cands, "teacher", "val_ndcg", 0.01)
    assert c.chosen == "teacher"
    assert "beyond" in c.reasons["a"] and "beyond" in c.reasons["b"]
    # a candidate slower than the teacher never wins even if better
    c = gate.choose_compressed(
        [_cand("teacher", 0.5, 1.0), _cand("big", 0.6, 2.0)], "teacher", "val_ndcg", 0.01
    )
    assert c.chosen == "teacher" and c.reasons["big"].startswith("slower than teacher")
    with pytest.raises(ValueError, match="teacher"):
        gate.choose_compressed([_cand("a", 0.1, 1.0)], "teacher", "val_ndcg", 0.01)
