"""The capacity model (benchmarks.capacity): per-event costs fitted from the scale records,
and the plan that scales them."""

import argparse

import pytest

from benchmarks.capacity import SPARK, fit, plan


def _records(stage: str, fixed: float, per_event: float, sizes=(10**5, 10**6, 10**7)):
    return [
        {"events": n, "stage": stage, "seconds": fixed + per_event * n, "peak_gib": 1.0, "exit": 0}
        for n in sizes
    ]


def test_fit_separates_start_up_from_the_per_event_cost():
    cost = fit(_records("features", fixed=12.0, per_event=2e-6), "features")
    assert cost.fixed_s == pytest.approx(12.0)
    assert cost.per_event_s == pytest.approx(2e-6)
    assert cost.seconds(10**8) == pytest.approx(212.0)


def test_fit_skips_a_failed_size_and_bounds_a_single_one():
    records = _records("train", fixed=5.0, per_event=1e-5, sizes=(10**5, 10**6))
    records.append({"events": 10**7, "stage": "train", "seconds": 9.0, "peak_gib": 9, "exit": 1})
    assert fit(records, "train").largest == 10**6  # the failed 10^7 does not count
    one = fit([{"events": 1000, "stage": "x", "seconds": 2.0, "peak_gib": 0.1, "exit": 0}], "x")
    assert one.per_event_s == pytest.approx(2.0 / 1000) and one.fixed_s == 0.0
    assert fit(records, "missing") is None


def test_the_plan_grows_with_events_and_shrinks_with_the_window():
    costs = {s: fit(_records(s, 10.0, 2e-6), s) for s in SPARK}
    costs["train"] = fit(_records("train", 10.0, 1e-5), "train")
    args = argparse.Namespace(
        window_hours=6.0, events_per_day=[1e8, 1e9], history_days=30, measured_cores=2,
        spark_share=0.5, spark_efficiency=0.9, node_cores=16, gpu_speedup=25.0,
        train_share=0.4, users_per_event=0.01, items_per_event=0.005, max_items=5e6,
        redis_headroom=1.5,
    )  # fmt: skip
    redis = {"user": 2000.0, "item": 200.0, "top_k": 20}
    small, big = plan(costs, redis, args)
    assert big["spark_cores"] == pytest.approx(10 * small["spark_cores"])
    assert big["gpus"] >= small["gpus"] and big["redis_gib"] > small["redis_gib"]
    # 6 Spark stages x 2e-6 s x 2 cores x 3e9 events over 3 h at 0.9 efficiency
    assert small["spark_cores"] == pytest.approx(6 * 2e-6 * 2 * 3e9 / (0.5 * 6 * 3600 * 0.9))
    args.window_hours = 12.0
    assert plan(costs, redis, args)[0]["spark_cores"] == pytest.approx(small["spark_cores"] / 2)


def test_the_sampling_effect_is_the_sample_users_own_figures():
    """``benchmarks.scale.sampling_effect``: a model judged on a sample of users scores the
    mean of those users' NDCG (a user's NDCG does not depend on who else is judged)."""
    import numpy as np
    import pandas as pd

    from benchmarks.scale import sampling_effect
    from training.evaluate import sample_users

    rng = np.random.default_rng(0)
    per_user = pd.DataFrame({"model": np.repeat(["a", "b"], 50), "segment": "all",
                             "user_idx": np.tile(np.arange(50), 2),
                             "ndcg": rng.random(100)})  # fmt: skip
    text = sampling_effect(per_user, users=10, seeds=5)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| a |") and lines[3].startswith("| b |")
    a = per_user[per_user["model"] == "a"].set_index("user_idx")["ndcg"]
    assert f"{a.loc[sample_users(a.index, 10, 42)].mean():.4f} [" in lines[2]
    assert f"{a.mean():.4f} [" in lines[2] and "(n=50)" in lines[2]


def test_the_neighbour_pool_effect_is_nil_when_the_pool_holds_every_user(tmp_path):
    """``benchmarks.scale.neighbour_pool_effect``: a pool at least as large as the users is
    the exhaustive search (difference exactly 0); a smaller one is judged on the same users.
    Defective rows of the synthetic log are dropped, not scored."""
    import numpy as np
    import pandas as pd

    from benchmarks.scale import neighbour_pool_effect, synth_purchases
    from shopml import schema as S

    rng = np.random.default_rng(0)
    n = 1_500
    events = pd.DataFrame({
        S.USER_ID: [f"u{u}" for u in rng.integers(0, 60, n)],
        S.ITEM_ID: [f"i{i}" for i in rng.zipf(1.6, n) % 80],
        S.TIMESTAMP: (pd.Timestamp("2025-01-01", tz="UTC")
                      + pd.to_timedelta(rng.integers(0, 90 * 86_400, n), unit="s")),
        S.EVENT_TYPE: rng.choice([S.PURCHASE, "view"], n),
    })  # fmt: skip
    events.loc[:4, S.USER_ID] = None  # defects
    (tmp_path / "events").mkdir()
    events.to_parquet(tmp_path / "events" / "part-0.parquet", coerce_timestamps="us")
    purchases = synth_purchases(tmp_path)
    assert purchases.notna().all().all()
    assert (
        len(purchases) == (events[S.USER_ID].notna() & (events[S.EVENT_TYPE] == S.PURCHASE)).sum()
    )
    whole = neighbour_pool_effect(tmp_path, pool=60)
    assert "pool - every user: NDCG@10 +0.0000 [+0.0000, +0.0000]" in whole
    assert "over 60 users" in neighbour_pool_effect(tmp_path, pool=10)


def test_the_paired_effect_is_the_difference_over_the_users_both_judged(tmp_path):
    """``benchmarks.scale.paired_effect``: what a changed setting costs each model, paired
    over the users both evaluations judged (a user judged once only is left out)."""
    import numpy as np
    import pandas as pd

    from benchmarks.scale import paired_effect

    rng = np.random.default_rng(1)
    ref = pd.DataFrame({"model": np.repeat(["a", "b"], 40), "segment": "all",
                        "user_idx": np.tile(np.arange(40), 2),
                        "ndcg": rng.random(80) * 0.5})  # fmt: skip
    changed = ref.copy()
    changed.loc[changed["model"] == "a", "ndcg"] += 0.1
    changed = changed[changed["user_idx"] != 0]  # one user judged only in the reference
    ref.to_parquet(tmp_path / "ref.parquet")
    changed.to_parquet(tmp_path / "changed.parquet")
    lines = paired_effect(tmp_path / "ref.parquet", tmp_path / "changed.parquet").splitlines()
    assert lines[2].startswith("| a |") and "+0.1000 [+0.1000, +0.1000] | 39 |" in lines[2]
    assert lines[3].startswith("| b |") and "+0.0000 [+0.0000, +0.0000] | 39 |" in lines[3]
