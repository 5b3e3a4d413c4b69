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


def _tiny_run(run_dir):
    """A run directory with eight users' training purchases and each one's held-out basket."""
    import json

    import pandas as pd

    from shopml import schema as S

    items = [f"i{j}" for j in range(6)]
    (run_dir / "vocab.json").write_text(json.dumps({"users": [], "items": items, "popular": []}))

    def events(day: int, offset: int) -> pd.DataFrame:
        return pd.DataFrame(
            [{S.USER_ID: f"u{u}", S.ITEM_ID: items[(u + offset) % 6], S.EVENT_TYPE: S.PURCHASE,
              S.TIMESTAMP: pd.Timestamp(f"2025-01-{day:02d}", tz="UTC")} for u in range(8)]
        )  # fmt: skip

    pd.concat([events(1, 0), events(2, 1)]).to_parquet(run_dir / "train_events.parquet")
    events(3, 0).to_parquet(run_dir / "test.parquet")
    pd.DataFrame({S.USER_ID: [f"u{u}" for u in range(8)]}).to_parquet(
        run_dir / "test_users.parquet"
    )


def test_max_users_judges_every_row_on_one_seeded_sample_of_test_users(tmp_path):
    """``eval.max_users``: the holdout of a seeded sample of users, the same for each row (the
    gate pairs them); the training events stay whole."""
    from training.evaluate import run_interactions

    _tiny_run(tmp_path)
    train, test, _ = run_interactions(tmp_path, max_users=3, seed=1)
    assert train.n_users == 8 and len(train.events) == 16
    sampled = set(test.user_ids[test.events["user_idx"].unique()])
    assert len(sampled) == 3 and len(test.events) == 3
    again = run_interactions(tmp_path, max_users=3, seed=1)[1]
    assert set(again.user_ids[again.events["user_idx"].unique()]) == sampled  # seeded
    assert len(run_interactions(tmp_path)[1].events) == 8  # 0: every test user

    table, per_user = evaluate_run(tmp_path, 2, {}, max_users=3, seed=1)
    assert set(table["model"]) == {"popularity", "personal_top_frequency"}
    for _, rows in per_user[per_user["segment"] == "all"].groupby("model"):
        assert len(rows) == 3
