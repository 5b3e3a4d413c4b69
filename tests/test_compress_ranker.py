"""The served ranker's compression (training/compress.py) on tiny seeded models: distillation,
ONNX export, int8, the gate's choice and the engine serving an ONNX ranker from a bundle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from served_model.ranker import (
    RANKER_FEATURES,
    OnnxRanker,
    Ranker,
    ranker_params,
    ranker_scores,
)
from shopml import schema as S
from training import compress as C
from training import gate

N_FEATURES = len(RANKER_FEATURES)


def _rows(n: int, seed: int) -> np.ndarray:
    """Raw feature rows: counts (log-normal) and rates in [0, 1], as serving reads them."""
    rng = np.random.default_rng(seed)
    return rng.lognormal(0.0, 1.0, size=(n, N_FEATURES)).astype(np.float32)


@pytest.fixture(scope="module")
def teacher() -> Ranker:
    """A teacher trained on a planted rule: two features decide the label."""
    from mlkit.two_stage import fit_ranker

    x = _rows(4000, 0)
    rng = np.random.default_rng(0)
    logit = 2.0 * np.log1p(x[:, 0]) - 1.5 * np.log1p(x[:, 3]) + rng.normal(0, 0.3, len(x))
    y = (logit > np.median(logit)).astype(np.float32)
    net, _ = fit_ranker(x, y, epochs=6, seed=0, batch_size=256, lr=1e-2)
    return net.eval()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_student_learns_the_teachers_ranking(teacher):
    from mlkit.two_stage import distil_ranker, init_student, teacher_logits

    x, held = _rows(3000, 1), _rows(500, 2)
    target = teacher_logits(teacher, held)
    torch.manual_seed(0)
    start = init_student(Ranker(1, 16), teacher).eval()
    student, curve = distil_ranker(
        teacher, x, epochs=20, seed=0, validation=held, cross_layers=1, hidden=16,
        batch_size=128, lr=1e-2,
    )  # fmt: skip
    assert len(student.net.cross) == 1 and student.net.deep[0].out_features == 16
    assert ranker_params(student) < ranker_params(teacher) / 2
    learnt = teacher_logits(student, held)
    before = teacher_logits(start, held)
    mse_before, mse_after = np.mean((before - target) ** 2), np.mean((learnt - target) ** 2)
    assert mse_after < 0.5 * mse_before  # distillation, not the initialisation, did this
    assert _spearman(learnt, target) > 0.95
    # top-10 of a 200-row list mostly agrees with the teacher's
    top = lambda s: set(np.argsort(-s[:200])[:10])  # noqa: E731
    assert len(top(learnt) & top(target)) >= 7
    assert curve[-1]["loss"] < curve[0]["loss"]


def test_onnx_export_matches_torch_and_keeps_the_contract(teacher, tmp_path):
    x = _rows(200, 3)
    onnx = OnnxRanker(C.export_onnx(teacher, x), "onnx", ranker_params(teacher))
    assert C.max_abs_diff(onnx, teacher, x) < 1e-4
    assert tuple(onnx(torch.from_numpy(x[:1])).shape) == (1,)  # dynamic batch
    assert tuple(onnx(x).shape) == (200,)
    # serving's path: NumPy in and out, no torch, the same probabilities as the module's
    assert isinstance(onnx.logits(x), np.ndarray) and onnx.logits(x).dtype == np.float32
    with torch.no_grad():
        expected = torch.sigmoid(teacher(torch.from_numpy(x))).numpy()
    scores = ranker_scores(onnx, x)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    np.testing.assert_allclose(ranker_scores(teacher, x), expected, rtol=1e-6)
    # round trip through the file the bundle carries and through pickle
    path = C.save_ranker(onnx, tmp_path / "r")
    assert path.suffix == ".onnx"
    again = C.load_saved_ranker(path, "onnx", onnx.params)
    assert np.array_equal(again(x).numpy(), onnx(x).numpy())
    import pickle

    assert np.array_equal(pickle.loads(pickle.dumps(onnx))(x).numpy(), onnx(x).numpy())
    q = OnnxRanker(C.quantize_onnx_int8(onnx.model_bytes), "onnx_int8", onnx.params)
    assert tuple(q(x).shape) == (200,)
    assert len(q.model_bytes) < len(onnx.model_bytes)
    assert C.max_abs_diff(q, teacher, x) < 0.5  # int8 moves the logits a little, not a lot


def test_the_graph_reads_log_scaled_rows_and_a_graph_from_before_still_serves(teacher):
    """The export leaves the log-scaling (six slow operators) to NumPy and says which columns
    in its metadata, int8 copies too; a graph exported whole, as before, reads raw rows.
    Negative values and zeros included (two-tower and EASE scores can be either)."""
    import onnx

    from served_model.ranker import LOG_SCALED_COLUMNS

    x = _rows(200, 7)
    x[::3, -3:] *= -1.0
    x[::5, :4] = 0.0
    new = OnnxRanker(C.export_onnx(teacher, x), "onnx", ranker_params(teacher))
    ops = {n.op_type for n in onnx.load_from_string(new.model_bytes).graph.node}
    assert not ops & {"Log", "Sign", "Where"}
    mask = C.metadata(new.model_bytes)[LOG_SCALED_COLUMNS].split(",")
    assert mask == ["1" if m else "0" for m in teacher._log_mask.tolist()] and "0" in mask
    assert C.max_abs_diff(new, teacher, x) < 1e-4
    q = OnnxRanker(C.quantize_onnx_int8(new.model_bytes), "onnx_int8", new.params)
    assert C.metadata(q.model_bytes)[LOG_SCALED_COLUMNS] == ",".join(mask)
    assert C.max_abs_diff(q, teacher, x) < 0.5
    whole = C._onnx_bytes(teacher.eval(), torch.from_numpy(x[:8]))  # as exported before
    assert LOG_SCALED_COLUMNS not in C.metadata(whole)
    old = OnnxRanker(whole, "onnx", ranker_params(teacher))
    assert C.max_abs_diff(old, teacher, x) < 1e-4


def test_int8_weights_have_seven_bits_so_cpus_without_vnni_do_not_saturate(teacher):
    """Full 8-bit weights saturate ONNX Runtime's u8 x s8 kernel on x86 CPUs without VNNI
    (a logit of this teacher moved by 6.2 on an AVX2-only EPYC): ``mlkit.int8`` quantizes to
    7 bits. Checked on the artifact itself, so it holds whatever CPU runs the test."""
    import onnx
    from onnx import numpy_helper

    from mlkit.int8 import WEIGHT_LIMIT

    onnx_bytes = C.export_onnx(teacher, _rows(16, 7))
    model = onnx.load_from_string(C.quantize_onnx_int8(onnx_bytes))
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer]
    quantized = [w for w in weights if w.dtype == np.int8 and w.size > 1]
    assert quantized, "no int8 weight in the quantized ranker"
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in quantized) <= WEIGHT_LIMIT


def test_torch_int8_keeps_the_output_shape_and_ranking(teacher):
    x = _rows(200, 4)
    q = C.quantize_ranker_int8(teacher)
    assert q.format == "torch_int8" and teacher.format == "torch"
    with torch.no_grad():
        out, ref = q(torch.from_numpy(x)), teacher(torch.from_numpy(x))
    assert out.shape == ref.shape == (200,)
    assert _spearman(out.numpy(), ref.numpy()) > 0.98
    assert ranker_params(q) == ranker_params(teacher)  # packed weights are still counted


def test_latency_is_measured_for_every_candidate_and_the_gate_uses_it(teacher):
    x = _rows(500, 5)
    rankers = {C.TEACHER: teacher, "torch_int8": C.quantize_ranker_int8(teacher)}
    times = C.ranking_latency(rankers, C.serving_rows(x), repeats=20)
    assert set(times) == set(rankers) and all(len(t) == 20 for t in times.values())
    rows = C.serving_rows(x)
    assert rows.shape == (C.SERVING_ROWS, N_FEATURES)
    assert (rows[:, : len(S.USER_FEATURES)] == rows[0, : len(S.USER_FEATURES)]).all()
    summary = C.latency_summary(times[C.TEACHER])
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert summary["p50_ms_ci_low"] <= summary["p50_ms"] <= summary["p50_ms_ci_high"]
    # the gate: a fast candidate beyond tolerance is refused; nothing qualifies -> teacher
    cands = [
        {"name": C.TEACHER, "val_ndcg": 0.30, "p50_ms": 1.0},
        {"name": "student", "val_ndcg": 0.28, "p50_ms": 0.2},
    ]
    choice = gate.choose_compressed(cands, C.TEACHER, "val_ndcg", 0.01)
    assert choice.chosen == C.TEACHER and "beyond 1% tolerance" in choice.reasons["student"]


def test_the_engine_serves_an_onnx_ranker_from_its_bundle(teacher, tmp_path):
    from served_model import bundle as B
    from served_model.engine import TwoStage
    from served_model.two_tower import TwoTower
    from shopml.config import ServingConfig

    torch.manual_seed(0)
    users, items = [f"u{i}" for i in range(20)], [f"i{j}" for j in range(80)]
    model = TwoTower(users, items, items[:5], dim=8).eval()
    ts = pd.Timestamp("2025-01-01", tz="UTC")
    rng = np.random.default_rng(0)
    purchases = pd.DataFrame({
        S.USER_ID: rng.choice(users, 300), S.ITEM_ID: rng.choice(items, 300),
        S.TIMESTAMP: ts + pd.to_timedelta(rng.integers(0, 60, 300), unit="D"),
    })  # fmt: skip
    catalog = pd.DataFrame({S.ITEM_ID: items})
    onnx = OnnxRanker(C.export_onnx(teacher, _rows(16, 6)), "onnx", ranker_params(teacher))
    files = B.write_artifacts(tmp_path / "v", model, onnx, purchases, catalog)
    assert (tmp_path / "v" / B.ONNX_RANKER_FILE) in files
    assert not (tmp_path / "v" / B.RANKER_FILE).exists()
    loaded = B.load_bundle("7", model, tmp_path / "v")
    assert isinstance(loaded.ranker, OnnxRanker)
    assert loaded.ranker_info == {
        "format": "onnx",
        "bytes": (tmp_path / "v" / B.ONNX_RANKER_FILE).stat().st_size,
        "params": ranker_params(teacher),
    }
    engine = TwoStage(loaded, features=None, cfg=ServingConfig())
    engine.item_features = _rows(len(items), 7)[:, : len(S.ITEM_FEATURES)]
    user_features = _rows(1, 8)[0, : len(S.USER_FEATURES)]
    ranked = engine.rank("u3", user_features, k=10)
    assert ranked.fallback is None and len(ranked.items) == 10
    # the same answer as the torch teacher, up to float rounding
    torch_engine = TwoStage(
        B.Bundle("7", model, teacher, loaded.index, loaded.tables, loaded.item_vectors),
        features=None,
        cfg=ServingConfig(),
    )
    torch_engine.item_features = engine.item_features
    expected = torch_engine.rank("u3", user_features, k=10)
    assert [i for i, _ in ranked.items] == [i for i, _ in expected.items]
    assert np.allclose([s for _, s in ranked.items], [s for _, s in expected.items], atol=1e-5)
    # a bundle without a ranker entry (format 2) still loads its ranker.pt
    import json

    torch.save(teacher, tmp_path / "v" / B.RANKER_FILE)
    manifest = json.loads((tmp_path / "v" / B.MANIFEST_FILE).read_text())
    manifest.pop("ranker")
    manifest["format_version"] = 2
    (tmp_path / "v" / B.MANIFEST_FILE).write_text(json.dumps(manifest))
    old = B.load_bundle("6", model, tmp_path / "v")
    assert isinstance(old.ranker, Ranker) and old.ranker_info["format"] == "torch"


@pytest.mark.parametrize(
    ("teacher_size", "student"), [((1, 32), (1, 16)), ((2, 64), (2, 32)), ((3, 128), (2, 32))]
)
def test_the_student_is_smaller_than_any_teacher_the_study_can_choose(teacher_size, student):
    """The served study sizes the teacher (1-3 cross layers, 32-128 wide): a fixed student of
    1 x 32 was as large as a 1 x 32 teacher. The default student is bounded by the teacher."""
    from shopml.config import TrainConfig

    cfg = TrainConfig()
    big = Ranker(*teacher_size)
    got = C.student_size(big, cfg.ranker_student_cross_layers, cfg.ranker_student_hidden)
    assert got == student
    assert ranker_params(Ranker(*got)) < ranker_params(big) / 1.5


@pytest.mark.parametrize(
    ("teacher_size", "sizes"),
    [
        ((1, 32), {"student": (1, 16), "student_0x16": (0, 16)}),
        ((2, 64), {"student": (2, 32), "student_1x32": (1, 32)}),
        ((3, 128), {"student": (2, 32), "student_1x32": (1, 32)}),
    ],
)
def test_each_further_student_has_one_cross_layer_fewer(teacher_size, sizes):
    from shopml.config import TrainConfig

    cfg = TrainConfig()
    got = C.student_sizes(Ranker(*teacher_size), cfg.ranker_student_cross_layers,
                          cfg.ranker_student_hidden, cfg.ranker_students)  # fmt: skip
    assert got == sizes
    assert C.student_sizes(Ranker(1, 32), 1, 16, 4) == {"student": (1, 16), "student_0x16": (0, 16)}


def test_every_student_is_exported_and_checked_against_its_own_module(teacher):
    """A shallower student's export has three operators fewer per cross layer, and each
    export matches its own torch student."""
    import onnx

    x = _rows(600, 6)
    rankers, facts = C.ranker_candidates(
        teacher, x[:500], x[500:], student_cross_layers=2, student_hidden=8, student_epochs=1,
        seed=0, batch_size=128, lr=1e-2, students=2,
    )  # fmt: skip
    first, shallow = C.student_sizes(teacher, 2, 8, 2)
    assert [n for n in rankers if n.startswith("student")] == [
        first,
        f"{first}_onnx",
        shallow,
        f"{shallow}_onnx",
    ]
    assert len(rankers[shallow].net.cross) == len(rankers[first].net.cross) - 1
    for name in (first, shallow):
        assert facts[f"{name}_onnx"]["max_abs_diff"] < 1e-4
        assert "distil_mse" in facts[name]

    def operators(name: str) -> int:
        return len(onnx.load_from_string(rankers[name].model_bytes).graph.node)

    assert operators(f"{shallow}_onnx") == operators(f"{first}_onnx") - 3


def test_replayed_rounds_average_each_users_baskets_and_pair_by_user():
    """Validation of the compression gate reads every replayed basket of a user as one
    value per user (their mean), so the paired bootstrap resamples users, not baskets."""
    from types import SimpleNamespace

    from mlkit.bootstrap import paired_ci
    from training.pipeline import ReplayedRounds

    def result(values: dict[str, float]) -> SimpleNamespace:
        frame = pd.DataFrame({S.USER_ID: list(values), "ndcg": list(values.values())})
        frame.insert(0, "user_idx", range(len(frame)))  # a round's own indexing, not the user
        return SimpleNamespace(segments={"all": frame})

    student = ReplayedRounds((result({"a": 1.0, "b": 0.0}), result({"b": 0.5})))
    teacher = ReplayedRounds((result({"a": 0.5, "b": 0.25}), result({"b": 0.25})))
    got = student.user_values("ndcg")
    pd.testing.assert_series_equal(
        got, pd.Series({"a": 1.0, "b": 0.25}, name="ndcg"), check_names=False, check_index=True
    )
    assert paired_ci(got, teacher.user_values()).mean == pytest.approx((0.5 + 0.0) / 2)
