"""Compression: an int8 copy of the model by PyTorch dynamic quantization.

Linear layers get int8 weights with dynamic activation quantization; embedding tables get
per-row int8 weights (``float_qparams``), which is where a recommender's bytes are.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from served_model.two_tower import TwoTower


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
