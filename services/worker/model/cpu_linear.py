"""Prepacked float32 linear layers for CPU, swapped in for nn.Linear after loading.

Two packings, best first:
- `NativeLinear`: the worker's own kernel (native/linear.c). It streams the weights under the
  FMAs, and each output row is computed the same way in any batch (batch invariant by
  construction). All SmolLM2 linears of one step at 32 rows, cold weights: 42-44 ms against
  oneDNN's 55-60 on the AVX-512 machine, 56 against 78 with both held to AVX2; 22-24 against
  26-29 ms at 1 row; 542-578 against 507-540 ms at 512 rows (prefill, ~7% slower).
- `OneDnnLinear`: oneDNN reorders the weight once into its blocked layout (torch's plain
  `F.linear` re-reads the row-major weight every call; 98.5 -> 52 ms at 32 rows on the AMD
  machine). Used where the native library does not build.

Reproduce with `bench/cpu_linear_bench.py`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from services.worker.native import linear as native_linear

logger = logging.getLogger(__name__)

ONEDNN_BATCH_HINT = 32


def packing_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and (
        native_linear.available() or torch.backends.mkldnn.is_available())


class NativeLinear(nn.Module):
    """y = x W^T + b with W packed for native/linear.c (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = native_linear.pack(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        return native_linear.linear(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=native"


class OneDnnLinear(nn.Module):
    """y = x W^T + b with W held as a oneDNN-packed tensor (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, ONEDNN_BATCH_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def packed_linear_class() -> type[nn.Module]:
    """The best packing this machine supports (the native kernel when it builds)."""
    return NativeLinear if native_linear.available() else OneDnnLinear


def pack_linears(model: nn.Module, cls: type[nn.Module] | None = None) -> int:
    """Replaces every nn.Linear in `model` by a packed layer; returns how many were replaced.

    cls: NativeLinear or OneDnnLinear; None picks `packed_linear_class()`. A tied LM head gets
    its own packed copy; the embedding keeps the original matrix.
    """
    cls = cls or packed_linear_class()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, cls(child))
                count += 1
    logger.info("packed %d linear layers (%s)", count, cls.__name__)
    return count
