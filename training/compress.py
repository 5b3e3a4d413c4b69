"""Compression: smaller or faster copies of the served models, measured and chosen by a gate.

* The two-tower: an int8 copy by PyTorch dynamic quantization (Linear layers int8 with dynamic
  activation quantization; embedding tables per-row int8, ``float_qparams``), reported beside
  the float model by ``evaluate``.
* The served DCN-v2 ranker (``served_model.ranker``): candidates built from the trained
  ranker (the *teacher*), all with the ranker's contract (raw features in, one logit per row
  out, log-scaling inside), so the engine swaps them freely:

  - ``teacher_fp32``: the reference;
  - ``torch_int8``: ``torch.ao`` dynamic int8 of its Linear layers;
  - ``onnx``: the dynamo ONNX export (``onnxscript``), run by ONNX Runtime, checked against
    the teacher's outputs (max abs difference recorded);
  - ``onnx_int8``: ONNX Runtime's dynamic int8 quantizer over that export;
  - ``student``: a smaller DCN-v2 (:func:`student_size`: ``train.ranker_student_cross_layers``
    / ``ranker_student_hidden``, bounded by the teacher's) started from the teacher's layers
    and distilled on the
    teacher's logits over the ranker's own training rows, with the one Horovod loop
    (``mlkit.two_stage.distil_ranker``); ``student_onnx``: its ONNX export;
  - ``student_<c>x<h>`` and ``student_<c>x<h>_onnx``: up to ``train.ranker_students`` - 1 more
    students, each with one cross layer fewer (:func:`student_sizes`): three operators
    (Gemm, Mul, Add) fewer per request each, so a shallower student is the faster one; the
    gate keeps it only when it stays within tolerance.

  :func:`ranking_latency` times the ranking stage at the serving shape (one user, 200
  candidates) for every candidate in one process, interleaved; ``training.pipeline.compress``
  evaluates NDCG@10 of the served path with each candidate swapped in, on the validation
  split (chooses, ``training.gate.choose_compressed``) and on the test split (reports).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from served_model.ranker import (
    LOG_SCALED_COLUMNS,
    RANKER_FEATURES,
    OnnxRanker,
    Ranker,
    features_of,
    ranker_inputs,
    ranker_logits,
    ranker_params,
    ranker_scores,
    ranker_view,
)
from served_model.two_tower import TwoTower, log_scale
from shopml import schema as S

TEACHER = "teacher_fp32"
SERVING_ROWS = 200  # candidates ranked per request (serving.max_candidates' default); the
# pipeline measures at the run's own ranking depth (its served study's max_candidates)


def quantize_int8(model: TwoTower) -> TwoTower:
    from torch.ao.quantization import float_qparams_weight_only_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao eager quantization is deprecated in favour of torchao, not yet removed.
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            copy.deepcopy(model).eval(),
            {
                nn.Linear: torch.ao.quantization.default_dynamic_qconfig,
                nn.Embedding: float_qparams_weight_only_qconfig,
            },
            dtype=torch.qint8,
        )
    return quantized


def quantize_ranker_int8(ranker: nn.Module) -> nn.Module:
    """Dynamic int8 of the ranker's Linear layers (BatchNorm stays float, in eval mode)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            copy.deepcopy(ranker).eval(), {nn.Linear: default_dynamic_qconfig}, dtype=torch.qint8
        )
    quantized.format = "torch_int8"
    return quantized


class _ScaledNet(nn.Module):
    """A ranker after its log-scaling: what :func:`export_onnx` puts in the graph."""

    def __init__(self, ranker: Ranker) -> None:
        super().__init__()
        self.net = ranker.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def export_onnx(ranker: nn.Module, example: np.ndarray) -> bytes:
    """The ranker as ONNX (dynamo exporter, dynamic batch), in eval mode (BatchNorm frozen);
    it reads the ranker's own columns (``features_of``) of ``example``'s rows. The graph is
    the network after the log-scaling, which :class:`OnnxRanker` does in NumPy (the metadata
    entry ``LOG_SCALED_COLUMNS`` says which columns; ``served_model.ranker``'s doc says why)."""
    ranker = copy.deepcopy(ranker).eval()
    example = ranker_view(ranker, example[: max(2, min(len(example), 8))])
    mask = ranker._log_mask
    x = log_scale(torch.from_numpy(np.ascontiguousarray(example)), mask)
    graph = _onnx_bytes(_ScaledNet(ranker), x)
    return with_metadata(graph, {LOG_SCALED_COLUMNS: ",".join("1" if m else "0" for m in mask)})


def _onnx_bytes(module: nn.Module, x: torch.Tensor) -> bytes:
    """``module`` exported by the dynamo exporter with a dynamic first dimension."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (x,),
            dynamo=True,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # ONNXProgram.save writes to a path
        path = Path(tmp) / "ranker.onnx"
        program.save(str(path))
        return path.read_bytes()


def with_metadata(model: bytes, entries: dict[str, str]) -> bytes:
    """``model`` with ``entries`` set in its ``metadata_props``."""
    import onnx

    proto = onnx.load_from_string(model)
    kept = {p.key: p.value for p in proto.metadata_props}  # set_model_props replaces them all
    onnx.helper.set_model_props(proto, {**kept, **entries})
    return proto.SerializeToString()


def metadata(model: bytes) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load_from_string(model).metadata_props}


def quantize_onnx_int8(model: bytes) -> bytes:
    """ONNX Runtime's dynamic int8 quantization (weights int8 with 7 bits, activations at run
    time: ``mlkit.int8``); the model's metadata is kept."""
    import tempfile

    from mlkit import int8

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        int8.quantize_dynamic(src, dst)
        return with_metadata(dst.read_bytes(), metadata(model))


def max_abs_diff(a: nn.Module | OnnxRanker, b: nn.Module | OnnxRanker, x: np.ndarray) -> float:
    """Largest absolute difference of two rankers' logits on rows ``x``."""
    return float(np.abs(ranker_logits(a, x) - ranker_logits(b, x)).max())


def save_ranker(ranker: nn.Module | OnnxRanker, path_stem: Path) -> Path:
    """``<stem>.onnx`` (the ONNX bytes) or ``<stem>.pt`` (the pickled module)."""
    if isinstance(ranker, OnnxRanker):
        path = path_stem.with_suffix(".onnx")
        path.write_bytes(ranker.model_bytes)
    else:
        path = path_stem.with_suffix(".pt")
        torch.save(ranker, path)
    return path


def load_saved_ranker(
    path: Path, fmt: str, params: int = 0, features: tuple[str, ...] = RANKER_FEATURES
) -> nn.Module | OnnxRanker:
    if path.suffix == ".onnx":
        return OnnxRanker(path.read_bytes(), fmt, params, features=features)
    return torch.load(path, weights_only=False).eval()


def student_size(teacher: Ranker, cross_layers: int, hidden: int) -> tuple[int, int]:
    """(cross layers, deep width) of the distilled student: the settings' values, but never
    more cross layers than the teacher has (each is copied from it whole) and never more than
    half its deep width. The served study chooses the teacher's size (1-3 cross layers, 32-128
    wide), so a fixed student size could be as large as the teacher and win nothing."""
    net = teacher.net
    return (min(cross_layers, len(net.cross)),
            max(4, min(hidden, net.deep[0].out_features // 2)))  # fmt: skip


def student_sizes(
    teacher: Ranker, cross_layers: int, hidden: int, students: int
) -> dict[str, tuple[int, int]]:
    """Name -> (cross layers, deep width) of each distilled student: ``student`` of
    :func:`student_size`, then up to ``students`` - 1 more with one cross layer fewer each
    (none below 0), named by their size."""
    first, width = student_size(teacher, cross_layers, hidden)
    sizes = {"student": (first, width)}
    for fewer in range(first - 1, max(first - students, -1), -1):
        sizes[f"student_{fewer}x{width}"] = (fewer, width)
    return sizes


def ranker_candidates(
    teacher: Ranker,
    x_train: np.ndarray,
    x_val: np.ndarray,
    *,
    student_cross_layers: int,
    student_hidden: int,
    student_epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    workers: int = 1,
    students: int = 1,
) -> tuple[dict[str, nn.Module | OnnxRanker], dict[str, dict[str, float]]]:
    """(name -> candidate ranker, name -> facts: ONNX max abs diff, student curve end)."""
    from mlkit.two_stage import distil_ranker

    teacher = teacher.eval()
    probe = x_val if len(x_val) else x_train[:1000]
    out: dict[str, nn.Module | OnnxRanker] = {TEACHER: teacher}
    facts: dict[str, dict[str, float]] = {TEACHER: {}}
    out["torch_int8"] = quantize_ranker_int8(teacher)
    params = ranker_params(teacher)
    onnx = export_onnx(teacher, probe)
    names = features_of(teacher)
    out["onnx"] = OnnxRanker(onnx, "onnx", params, features=names)
    out["onnx_int8"] = OnnxRanker(quantize_onnx_int8(onnx), "onnx_int8", params, features=names)
    sizes = student_sizes(teacher, student_cross_layers, student_hidden, students)
    for name, (cross_layers, hidden) in sizes.items():
        student, curve = distil_ranker(
            teacher,
            x_train,
            student_epochs,
            seed,
            x_val if len(x_val) else None,
            cross_layers=cross_layers,
            hidden=hidden,
            batch_size=batch_size,
            lr=lr,
            workers=workers,
        )
        student.format = "torch"
        out[name] = student
        facts[name] = {"distil_mse": float(curve[-1].get("val_loss", curve[-1]["loss"]))}
        out[f"{name}_onnx"] = OnnxRanker(
            export_onnx(student, probe), "onnx", ranker_params(student), features=names
        )
    for name, ranker in out.items():
        facts.setdefault(name, {})
        torch_of = name.removesuffix("_onnx")  # an export is checked against its own module
        reference = out[torch_of] if torch_of in sizes else teacher
        facts[name]["max_abs_diff"] = max_abs_diff(ranker, reference, probe[:2000])
    return out, facts


def serving_rows(x: np.ndarray, n: int = SERVING_ROWS, seed: int = 0) -> np.ndarray:
    """``n`` rows of one user's request shape: one user's features broadcast, candidates'
    item and history features drawn from real rows (seeded)."""
    rng = np.random.default_rng(seed)
    rows = x[rng.choice(len(x), size=n, replace=len(x) < n)].copy()
    rows[:, : len(S.USER_FEATURES)] = rows[0, : len(S.USER_FEATURES)]
    return rows


def ranking_latency(
    rankers: dict[str, nn.Module | OnnxRanker],
    rows: np.ndarray,
    repeats: int = 300,
    k: int = 10,
) -> dict[str, np.ndarray]:
    """Wall times (ms) of the serving ranking stage (assemble the rows, score, top-k) per
    ranker, one thread, interleaved round-robin so every ranker sees the same machine state."""
    nu, ni = len(S.USER_FEATURES), len(S.ITEM_FEATURES)
    user, items, history = rows[0, :nu], rows[:, nu : nu + ni], rows[:, nu + ni :]

    def stage(ranker: nn.Module | OnnxRanker) -> Callable[[], None]:
        def run() -> None:
            scores = ranker_scores(ranker, ranker_inputs(user, items, history))
            np.argsort(-scores, kind="stable")[:k]

        return run

    runs = {name: stage(r) for name, r in rankers.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as serving (serving/app.py)
    try:
        return interleaved_times({n: (lambda i, run=run: run()) for n, run in runs.items()},
                                 repeats, warmup=10)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def interleaved_times(
    runs: dict[str, Callable[[int], object]], n: int, warmup: int = 1
) -> dict[str, np.ndarray]:
    """Wall times (ms) of calls ``run(0) … run(n - 1)`` of every runner, interleaved (call i
    of every runner before call i + 1 of any), after ``warmup`` untimed calls each: drift of
    a shared machine hits every candidate alike. Used for every compression table."""
    for run in runs.values():
        for i in range(warmup):
            run(i)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(n):
        for name, run in runs.items():
            started = time.perf_counter()
            run(i)
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: np.asarray(v) for name, v in times.items()}


def latency_summary(times: np.ndarray, n_boot: int = 500, seed: int = 0) -> dict[str, float]:
    """p50 / p99 (ms) and a percentile-bootstrap 95% CI of the p50."""
    rng = np.random.default_rng(seed)
    boots = np.median(rng.choice(times, size=(n_boot, len(times)), replace=True), axis=1)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "p50_ms_ci_low": float(np.percentile(boots, 2.5)),
        "p50_ms_ci_high": float(np.percentile(boots, 97.5)),
    }


def artifact_bytes(path: Path) -> int:
    return path.stat().st_size
