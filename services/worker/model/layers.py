"""Small layers shared by the decoder models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.native import fused_ops


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, optionally fused with the residual add.

On CPU in float32 one native pass does both (native/fused_ops.c); the torch code below is
its reference and the fallback.

    `forward(x)` returns the normed x; `forward(x, residual)` adds first and returns
    (normed(x + residual), x + residual), so a decoder layer keeps one running residual stream.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # One fused kernel; bit-identical to the three-op form below in float32.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:  # one fused Triton kernel for the add and the norm
            from services.worker.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if fused_ops.supports(x) and x.is_contiguous() and (
                residual is None or residual.is_contiguous()):
            return fused_ops.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class SiluAndMul(nn.Module):
    """SwiGLU activation over a fused [gate | up] projection: [T, 2I] -> [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops.supports(x) and x.is_contiguous():
            return fused_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
