"""Compressing the search cross-encoder: each technique makes a reranker directory that
``served_model.search.load_cross_encoder`` serves (see ``RERANKER_FORMATS`` there).

* :func:`student_from_teacher`: a shallower cross-encoder whose layers are copies of evenly
  spaced teacher layers (as DistilBERT is initialised); it then learns the teacher's logits in
  the one Horovod loop (``search.train.DistilTask``);
* :func:`prune_ffn`: structured pruning with ``torch-pruning``: the least important feed-forward
  channels of every layer are *removed* (both Linear layers shrink, and the config with them),
  so the model is really smaller and faster; a short distillation fine-tune follows;
* :func:`quantize_torch`: PyTorch dynamic int8 (``torch.ao``) of the Linear layers;
* :func:`export_onnx`: ``torch.onnx.export`` with the dynamo exporter (``onnxscript``), dynamic
  batch and sequence axes, checked against the PyTorch logits (the max abs difference is kept);
* :func:`quantize_onnx`: ONNX Runtime's quantizer, dynamic (weights int8, activations quantized
  per call) or static (activation ranges calibrated on training queries' candidates, QDQ),
  with 7-bit weights so the int8 model is right on x86 CPUs without VNNI (``mlkit.int8``).

Every output directory carries ``reranker.json`` (format, max_length, params, what made it).
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from served_model.search import RERANKER_INFO, load_cross_encoder, weights_file


def parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _write_info(out: Path, fmt: str, max_length: int, params: int, **extra: Any) -> None:
    info = {"format": fmt, "max_length": max_length, "params": params, **extra}
    (out / RERANKER_INFO).write_text(json.dumps(info, indent=2))


def _hf(cross_encoder: Any) -> nn.Module:
    """The transformers model (``BertForSequenceClassification``) inside a CrossEncoder."""
    return cross_encoder.model


def student_from_teacher(teacher: Path, out: Path, layers: int, max_tokens: int) -> Path:
    """The teacher with only ``layers`` of its encoder layers, evenly spaced, first and last
    kept; a sentence-transformers directory (format ``torch``) ready for distillation."""
    ce = load_cross_encoder(teacher, max_tokens)
    encoder = _hf(ce).base_model.encoder
    total = len(encoder.layer)
    if not 1 <= layers <= total:
        raise ValueError(f"student layers must be within 1..{total}, got {layers}")
    keep = sorted({int(round(i)) for i in np.linspace(0, total - 1, layers)})
    encoder.layer = nn.ModuleList(encoder.layer[i] for i in keep)
    _hf(ce).config.num_hidden_layers = len(keep)
    ce.save(str(out))
    return out


def prune_ffn(teacher: Path, out: Path, ratio: float, max_tokens: int) -> Path:
    """The teacher with ``ratio`` of every layer's feed-forward channels removed.

    Importance of a channel: the L2 norm of its row in the expanding Linear times the norm of
    its column in the projecting one (what the channel reads times what it writes).
    ``torch-pruning``'s dependency graph removes the channel from both layers (and anything
    else coupled to it), so the shapes really shrink; the same count per layer keeps the
    transformers config (one ``intermediate_size``) true.
    """
    import torch_pruning as tp

    if not 0 < ratio < 1:
        raise ValueError(f"prune ratio must be in (0, 1), got {ratio}")
    ce = load_cross_encoder(teacher, max_tokens)
    hf = _hf(ce).eval()
    example = dict(ce.tokenizer(["a query"], ["a product"], return_tensors="pt"))
    graph = tp.DependencyGraph().build_dependency(hf, example_inputs=example)
    width = hf.config.intermediate_size
    keep = max(1, int(round(width * (1 - ratio))))
    for layer in hf.base_model.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        importance = up.weight.detach().norm(dim=1) * down.weight.detach().norm(dim=0)
        drop = torch.argsort(importance)[: width - keep].tolist()
        graph.get_pruning_group(up, tp.prune_linear_out_channels, idxs=drop).prune()
    hf.config.intermediate_size = keep
    ce.save(str(out))
    return out


def quantize_torch(source: Path, out: Path, max_tokens: int) -> Path:
    """PyTorch dynamic int8 of the Linear layers, saved whole (format ``torch_int8``)."""
    from torch.ao.quantization import quantize_dynamic

    ce = load_cross_encoder(source, max_tokens)
    with warnings.catch_warnings():  # torch.ao eager quantization: deprecated, not removed
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(copy.deepcopy(ce).eval(), {nn.Linear}, dtype=torch.qint8)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(quantized, out / "model.pt")
    _write_info(out, "torch_int8", max_tokens, parameters(_hf(ce)), source=source.name)
    return out


class _Logits(nn.Module):
    """The transformers model as a function of its three input tensors, returning logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:  # noqa: ANN001
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_onnx(source: Path, out: Path, max_tokens: int, check_pairs: list[list[str]]) -> float:
    """ONNX (fp32, format ``onnx``) of a sentence-transformers cross-encoder directory, with its
    tokenizer; returns the max abs difference of its logits to PyTorch's on ``check_pairs``."""
    import onnxruntime as ort

    ce = load_cross_encoder(source, max_tokens)
    hf = _hf(ce).eval()
    enc = ce.tokenizer([p[0] for p in check_pairs], [p[1] for p in check_pairs], padding=True,
                       truncation=True, max_length=max_tokens, return_tensors="pt")  # fmt: skip
    args = tuple(enc[name] for name in INPUTS)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Logits(hf), args, str(out / "model.onnx"), dynamo=True, input_names=list(INPUTS),
            output_names=["logits"], dynamic_shapes={n: {0: batch, 1: seq} for n in INPUTS},
            external_data=False, verbose=False,
        )  # fmt: skip
    ce.tokenizer.save_pretrained(str(out))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: enc[n].numpy() for n in INPUTS})[0]
    with torch.inference_mode():
        want = hf(**enc).logits.numpy()
    diff = float(np.abs(got - want).max())
    _write_info(out, "onnx", max_tokens, parameters(hf), source=source.name, max_abs_diff=diff)
    return diff


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader`` over tokenized (query, product) batches."""

    def __init__(self, tokenizer: Any, pairs: list[list[str]], max_tokens: int, batch: int = 20):
        self.batches = [
            {n: v.astype(np.int64) for n, v in tokenizer(
                [p[0] for p in pairs[i : i + batch]], [p[1] for p in pairs[i : i + batch]],
                padding=True, truncation=True, max_length=max_tokens, return_tensors="np",
            ).items() if n in INPUTS}
            for i in range(0, len(pairs), batch)
        ]  # fmt: skip

    def get_next(self) -> dict[str, np.ndarray] | None:
        return self.batches.pop(0) if self.batches else None


def quantize_onnx(source: Path, out: Path, static_pairs: list[list[str]] | None = None) -> Path:
    """int8 of an ONNX reranker directory: dynamic (``static_pairs`` None, format
    ``onnx_int8``), or static with activation ranges calibrated on ``static_pairs``
    (format ``onnx_int8_static``, QDQ, per-channel weights); both ``mlkit.int8``."""
    from transformers import AutoTokenizer

    from mlkit import int8

    info = json.loads((source / RERANKER_INFO).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():  # the tokenizer's files
        if f.name not in ("model.onnx", RERANKER_INFO):
            shutil.copy2(f, out / f.name)
    src, dst = source / "model.onnx", out / "model.onnx"
    if static_pairs is None:
        int8.quantize_dynamic(src, dst)
        fmt = "onnx_int8"
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        reader = _Calibration(tokenizer, static_pairs, int(info["max_length"]))
        int8.quantize_static(src, dst, reader, op_types_to_quantize=["MatMul", "Gemm"])
        fmt = "onnx_int8_static"
    _write_info(out, fmt, int(info["max_length"]), int(info["params"]), source=source.name,
                calibration_pairs=len(static_pairs or []))  # fmt: skip
    return out


def size_bytes(path: Path) -> int:
    """The reranker's weights file size (tokenizer files are the same for every candidate)."""
    return weights_file(path).stat().st_size
