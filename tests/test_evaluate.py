"""The nightly evaluation table: one row per name, refused before any work."""

import pytest

from training.evaluate import check_unique_names, evaluate_run


def test_two_rows_with_one_name_are_refused_before_anything_is_read(tmp_path):
    missing = tmp_path / "no-run-here"  # reading it would fail differently
    with pytest.raises(ValueError, match=r"unique names; \['two_tower'\] would appear twice"):
        evaluate_run(missing, 10, {"two_tower": None}, zoo={"two_tower": ("two_tower", {})})
    check_unique_names(["popularity", "two_tower", "two_stage"])  # distinct names pass


def test_served_vs_best_picks_the_best_zoo_or_baseline_row_and_pairs_users():
    """The run's one-line answer compares the served path with the best zoo model or baseline
    (never the two-tower it is built on, nor a champion), per user and paired."""
    import numpy as np
    import pandas as pd

    from training.evaluate import served_vs_best

    rng = np.random.default_rng(0)
    base = rng.random(200)
    scores = {"two_stage": base + 0.05, "user_knn": base, "personal_top_frequency": base - 0.02,
              "two_tower": base + 0.5, "champion_v1_two_stage": base + 0.5}  # fmt: skip
    roles = {"two_stage": "served", "user_knn": "zoo", "personal_top_frequency": "baseline",
             "two_tower": "retrieval", "champion_v1_two_stage": "champion"}  # fmt: skip
    table = pd.DataFrame({"model": list(scores), "role": [roles[m] for m in scores],
                          "ndcg_at_10": [s.mean() for s in scores.values()]})  # fmt: skip

    def per_user(scores: dict) -> pd.DataFrame:
        return pd.concat(
            pd.DataFrame({"user_idx": np.arange(200), "ndcg": s, "model": m, "segment": "all"})
            for m, s in scores.items()
        )

    v = served_vs_best(table, per_user(scores), "two_stage", 10)
    assert v["best_other"] == "user_knn" and v["verdict"] == "better"
    assert v["diff"] == pytest.approx(0.05) and v["diff_ci_low"] == pytest.approx(0.05)
    assert v["diff_to_personal_top_frequency"] == pytest.approx(0.07)
    worse = per_user({**scores, "two_stage": base - 0.1})
    assert served_vs_best(table, worse, "two_stage", 10)["verdict"] == "worse"
