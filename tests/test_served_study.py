"""The served configuration's study: exact selection of smaller quotas, the study's record,
and the version's own retrieval settings in serving (tiny seeded data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from shopml import schema as S
from shopml.config import ServingConfig
from tests.test_recommenders import _clustered


@pytest.fixture(scope="module")
def replay():
    """Events of two taste clusters (4 baskets per user), a two-tower over them and the zoo
    scorers, as ``train_ranker`` binds them."""
    from served_model.two_tower import TwoTower
    from zoo.hybrid import raw_events
    from zoo.sources import source_fitter

    data = _clustered(users=40, items=60, per_user=12)
    events = raw_events(data)
    torch.manual_seed(0)
    model = TwoTower(list(data.user_ids), list(data.item_ids), list(data.item_ids[:5]), dim=8)
    sources = source_fitter(model.user_index, list(model.item_ids),
                            {"user_knn": {}, "ease": {"l2": 50.0}})  # fmt: skip
    return events, model.eval(), sources


def _rows(replay, cfg: ServingConfig, rounds: int = 1) -> pd.DataFrame:
    from mlkit.two_stage import no_features, replayed_rows

    events, model, sources = replay
    return replayed_rows(model, events, rounds, no_features, cfg, sources)


SMALL = [
    {"history_candidates": 3, "user_knn_candidates": 5, "ease_candidates": 0,
     "ann_candidates": 4, "knn_candidates": 2, "popular_candidates": 5, "max_candidates": 12},
    {"history_candidates": 0, "user_knn_candidates": 0, "ease_candidates": 7,
     "ann_candidates": 0, "knn_candidates": 6, "popular_candidates": 0, "max_candidates": 50},
    {"history_candidates": 10, "user_knn_candidates": 10, "ease_candidates": 10,
     "ann_candidates": 10, "knn_candidates": 10, "popular_candidates": 10, "max_candidates": 9},
]  # fmt: skip


@pytest.mark.parametrize("small", SMALL)
def test_selecting_smaller_quotas_equals_replaying_with_them(replay, small):
    """One replay at the top quotas serves every trial: selecting a trial's quotas out of it
    gives exactly the rows (and order) a replay with those quotas gives."""
    from mlkit.two_stage import select_candidates
    from training.served_study import upper_config

    upper = upper_config(ServingConfig())
    wide = _rows(replay, upper)
    cfg = ServingConfig(**small)
    narrow = _rows(replay, cfg)
    chosen = select_candidates(wide, cfg)
    key = [S.USER_ID, S.ITEM_ID]
    assert len(narrow) > 0 and len(wide) > len(narrow)
    assert chosen[key].values.tolist() == narrow[key].values.tolist()
    assert chosen["label"].tolist() == narrow["label"].tolist()


def test_the_study_starts_from_the_settings_and_keeps_its_best_trial(replay, settings):
    from mlkit.two_stage import REPLAY_ROUND, replayed_baskets
    from served_model.engine import RETRIEVAL_FIELDS
    from served_model.ranker import RANKER_FEATURES
    from training.served_study import served_study, upper_config

    events, _, _ = replay
    settings = settings.model_copy(
        update={"train": settings.train.model_copy(
            update={"served_study_trials": 4, "ranker_epochs": 2, "ranker_batch_size": 64})}
    )  # fmt: skip
    rows = _rows(replay, upper_config(settings.serving), rounds=3)
    assert sorted(rows[REPLAY_ROUND].unique()) == [0, 1, 2]
    record = served_study(settings, rows, replayed_baskets(events, 3))
    key = f"val_ndcg_at_{settings.eval.k}"
    trials = record["trials"]
    assert len(trials) == 4
    # trial 0 is the settings' configuration, all features, the default ranker
    first = trials[0]
    assert first["retrieval"] == {f: getattr(settings.serving, f) for f in RETRIEVAL_FIELDS}
    assert first["ranker"] == {"cross_layers": 2, "hidden": 64, "features": list(RANKER_FEATURES)}
    assert record[f"default_{key}"] == first[key]
    # the best trial replaces the settings' only with a validation lead whose CI is above 0
    assert record[f"best_{key}"] == max(t[key] for t in trials) > 0.1  # the clusters are planted
    lead = record["best_vs_default"]
    assert lead["ci_low"] <= lead["diff"] <= lead["ci_high"]
    replaced = record["best_trial"] != 0 and lead["ci_low"] > 0
    assert record["chosen_trial"] == (record["best_trial"] if replaced else 0)
    assert record[key] == trials[record["chosen_trial"]][key]
    assert record["retrieval"] == trials[record["chosen_trial"]]["retrieval"]
    assert record["decision"].startswith("trial" if replaced else "kept the settings'")
    assert record["validation"]["users"] == events[S.USER_ID].nunique()


def test_the_study_refuses_a_single_round(replay, settings):
    from mlkit.two_stage import replayed_baskets
    from training.served_study import served_study

    events, _, _ = replay
    rows = _rows(replay, ServingConfig(), rounds=1)
    with pytest.raises(ValueError, match="ranker_rounds >= 2"):
        served_study(settings, rows, replayed_baskets(events, 1))


def test_a_version_serves_with_its_own_quotas_unless_the_operator_set_them():
    from served_model.engine import version_config

    chosen = {"ann_candidates": 60, "max_candidates": 150}
    assert version_config(ServingConfig(), chosen).ann_candidates == 60
    assert version_config(ServingConfig(), chosen).max_candidates == 150
    operator = ServingConfig(ann_candidates=300)  # e.g. SHOPML_SERVING__ANN_CANDIDATES
    cfg = version_config(operator, chosen)
    assert (cfg.ann_candidates, cfg.max_candidates) == (300, 150)
    assert version_config(ServingConfig(), {}) == ServingConfig()
    with pytest.raises(ValueError, match="unknown fields"):
        version_config(ServingConfig(), {"reorder_min_rate": 1})


def test_the_bundle_carries_the_chosen_quotas_to_the_engine(replay, tmp_path):
    from served_model import bundle as B
    from served_model.engine import TwoStage
    from served_model.ranker import Ranker

    events, model, sources = replay
    catalog = pd.DataFrame({S.ITEM_ID: model.item_ids})
    chosen = {"user_knn_candidates": 30, "max_candidates": 75}
    B.write_artifacts(tmp_path, model, Ranker().eval(), events, catalog, sources(events), chosen)
    loaded = B.load_bundle("7", model, tmp_path)
    assert loaded.retrieval == chosen
    engine = TwoStage(loaded, features=None, cfg=ServingConfig())
    assert (engine.cfg.user_knn_candidates, engine.cfg.max_candidates) == (30, 75)
    assert engine.cfg.ann_candidates == ServingConfig().ann_candidates
    assert np.isfinite(loaded.item_vectors).all()


def test_a_clearly_better_configuration_replaces_a_poor_setting(replay, settings):
    """Settings that retrieve only popular items lose to any trial that lets the user's own
    purchases or similar shoppers' in: the study replaces them, with a CI above 0."""
    from mlkit.two_stage import replayed_baskets
    from training.served_study import served_study, upper_config

    events, _, _ = replay
    poor = {"history_candidates": 0, "user_knn_candidates": 0, "ease_candidates": 0,
            "ann_candidates": 0, "knn_candidates": 0, "popular_candidates": 5}  # fmt: skip
    settings = settings.model_copy(update={
        "serving": settings.serving.model_copy(update=poor),
        "train": settings.train.model_copy(
            update={"served_study_trials": 4, "ranker_epochs": 2, "ranker_batch_size": 64}),
    })  # fmt: skip
    rows = _rows(replay, upper_config(settings.serving), rounds=3)
    record = served_study(settings, rows, replayed_baskets(events, 3))
    assert record["chosen_trial"] != 0 and record["best_vs_default"]["ci_low"] > 0
    assert record["decision"].startswith(f"trial {record['chosen_trial']} beats")
    assert record["val_ndcg_at_10"] > record["default_val_ndcg_at_10"]


def test_a_user_sample_replays_only_those_users_with_the_same_lists(replay):
    """``max_users`` (train.ranker_max_users) keeps a seeded sample of users' replayed
    rows; the tables still know everyone, so each kept user's rows are what the full replay
    gives them."""
    from mlkit.two_stage import no_features, replayed_rows

    events, model, sources = replay
    cfg = ServingConfig()
    full = replayed_rows(model, events, 2, no_features, cfg, sources, seed=7)
    some = replayed_rows(model, events, 2, no_features, cfg, sources, seed=7, max_users=10)
    kept = some[S.USER_ID].unique()
    assert len(kept) == 10
    again = replayed_rows(model, events, 2, no_features, cfg, sources, seed=7, max_users=10)
    assert sorted(again[S.USER_ID].unique()) == sorted(kept)  # seeded
    mine = full[full[S.USER_ID].isin(kept)].reset_index(drop=True)
    pd.testing.assert_frame_equal(some.reset_index(drop=True), mine)
    everyone = replayed_rows(model, events, 2, no_features, cfg, sources, max_users=10**6)
    pd.testing.assert_frame_equal(everyone, full)  # a cap above the users changes nothing
