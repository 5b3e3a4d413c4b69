"""ONNX Runtime's int8 quantizer, with the one setting that keeps int8 models right on every
x86 CPU: 7-bit weights (``reduce_range``).

Why: ONNX Runtime multiplies uint8 activations by int8 weights with ``VPMADDUBSW`` on x86 CPUs
without VNNI (AVX2, AVX-512 before Cascade Lake, AMD before Zen 4), which adds pairs of
products into a saturating 16-bit lane. With full 8-bit weights a pair can exceed it and the
result is silently clipped: on such a machine (an AMD EPYC with AVX2 only, 2026-12-06) the
served ranker's int8 export moved a logit by 6.2 where 7-bit weights move it by 0.37, and a
model quantized and judged on a VNNI machine would serve wrong scores on an older node.
ONNX Runtime's documentation names ``reduce_range`` for exactly this; on VNNI CPUs it costs
one bit of weight precision, which the compression gate measures like any other loss.
Both quantizers are used by the served ranker (``training.compress``) and the search
reranker (``search.compress``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

REDUCE_RANGE = True  # 7-bit weights: see the module doc
WEIGHT_LIMIT = 64  # |int8 weight| with 7 bits (the tests check the artifacts against it)


def quantize_dynamic(src: Path, dst: Path) -> None:
    """Dynamic int8: weights int8 (7-bit), activations quantized at run time."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    with _quiet():
        ort_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=REDUCE_RANGE)


def quantize_static(src: Path, dst: Path, reader: Any, **options: Any) -> None:
    """Static int8 (QDQ, int8 activations calibrated on ``reader``'s batches, per-channel
    7-bit weights); ``options`` pass on to ONNX Runtime (e.g. ``op_types_to_quantize``)."""
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_static

    with _quiet():
        ort_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            reduce_range=REDUCE_RANGE, **options,
        )  # fmt: skip


class _quiet:
    """The quantizer's "consider pre-processing" advice, at WARNING on the root logger."""

    def __enter__(self) -> None:
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().setLevel(self.level)
