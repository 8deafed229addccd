"""Optional weight-only quantisation of the model's linear layers (``weights: int8``).

Built on torch's own dynamic int8 quantisation (``torch.ao.quantization.quantize_dynamic``):
int8 weights with per-channel scales, fp32 activations, fbgemm/qnnpack kernels on CPU. It lets
a 7B/13B checkpoint fit a smaller machine; it does not touch the KV cache.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class WeightReport:
    """Bytes of the linear layers' weights before and after quantisation."""

    linear_bytes_before: int
    linear_bytes_after: int


def quantize_linear_weights(model: nn.Module, mode: str) -> WeightReport | None:
    """Quantise every ``nn.Linear`` inside the decoder layers in place (``mode``: ``none`` or ``int8``).

    The LM head and embeddings stay as they are (they are tied in many checkpoints).
    """
    if mode == "none":
        return None
    if mode != "int8":
        raise ValueError(f"weights must be 'none' or 'int8', got {mode!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("weights: int8 uses torch's CPU int8 kernels; load the model on the CPU")
    layers = model.model.layers
    before = _linear_bytes(layers)
    with warnings.catch_warnings():
        # torch marks its quantised tensors as moving to torchao; they remain its supported CPU int8 path.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        quantized = torch.ao.quantization.quantize_dynamic(layers, {nn.Linear}, dtype=torch.qint8, inplace=False)
    model.model.layers = quantized
    return WeightReport(before, _linear_bytes(quantized))


def _linear_bytes(module: nn.Module) -> int:
    total = 0
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in sub.parameters())
        elif type(sub).__name__ == "Linear" and hasattr(sub, "_packed_params"):
            weight, bias = sub._packed_params._weight_bias()
            total += weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
    return total
