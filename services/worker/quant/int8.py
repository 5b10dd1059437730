"""Weight-only int8, symmetric, one scale per output channel: W[n] = q[n] * scale[n]."""

from __future__ import annotations

import torch

from .base import QuantLinear
from .gguf_blocks import GGUFBlocks


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: float [N, K] -> (q int8 [N, K], scale float32 [N]), round to nearest, |q| <= 127."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: q = 0
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(QuantLinear):
    """Buffers: qweight int8 [N, K], scale float32 [N]; on CPU also unit_scale (bf16 ones [N]).

    torch's `_weight_int8pack_mm` reads the int8 matrix as is (no packing step) but takes bf16
    scales with bf16 activations. A bf16 scale is off by up to 2^-9, the same way for every
    token: a fixed gain error per output channel. The kernel gets unit scales instead and the
    float32 scale is applied to its output (on SmolLM2: mean KL 0.0028 -> 0.0024 vs float32).
    """

    scheme = "int8"
    small_m = 24  # kernel 2.8 vs dequantize 3.7 ms at 16 rows, 5.5 vs 4.8 at 32 (one layer)

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                    device=device))
        self.register_buffer("scale", torch.zeros(out_features, device=device))
        self.register_buffer("unit_scale", None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Quantizes a float weight [N, K] (and keeps a float bias [N])."""
        mod = cls(weight.shape[1], weight.shape[0], bias is not None, weight.device)
        mod.load_rows(0, weight)
        if bias is not None:
            mod.load_bias(0, bias)
        mod.finalize()
        return mod

    @torch.no_grad()
    def load_rows(self, offset: int, source) -> None:
        # GGUF Q8_0 has a scale per 32 weights, this format one per row: no layout match, so
        # block sources re-quantize from their dequantized rows (only rows, never the model).
        w = source.dequantize() if isinstance(source, GGUFBlocks) else source
        q, scale = quantize_int8(w)
        self.qweight[offset:offset + q.shape[0]] = q.to(self.qweight.device)
        self.scale[offset:offset + q.shape[0]] = scale.to(self.scale.device)

    @torch.no_grad()
    def load_codes(self, offset: int, q: torch.Tensor, scale: torch.Tensor) -> None:
        """Rows already quantized elsewhere (GPTQ): q int8 [rows, K], scale [rows]."""
        self.qweight[offset:offset + q.shape[0]] = q.to(self.qweight.device)
        self.scale[offset:offset + q.shape[0]] = scale.to(self.scale.device)

    def finalize(self) -> None:
        if self._finalized:
            return
        if self.qweight.device.type == "cpu":
            self.unit_scale = torch.ones(self.out_features, dtype=torch.bfloat16)
        super().finalize()

    def dequantize_rows(self, rows: torch.Tensor | None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        sel = slice(None) if rows is None else rows
        q, s = self.qweight[sel], self.scale[sel]
        return q.to(dtype).mul_(s.to(dtype)[:, None])

    def _cuda_matmul(self, x: torch.Tensor) -> torch.Tensor:
        from services.worker.kernels.quant_matmul import int8_matmul_triton

        return int8_matmul_triton(x, self.qweight, self.scale)

    def _cpu_small_matmul(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight,
                                               self.unit_scale)
        return y.float().mul_(self.scale)
