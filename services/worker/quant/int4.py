"""Weight-only int4, group-wise with zero points (the portable format of
services/worker/kernels/int4_format.py): W[n, k] = (code - 8) * scales[n, g] + zeros[n, g]."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from services.worker.kernels.int4_format import dequantize_int4, pack_int4, unpack_int4

from .base import QuantLinear
from .gguf_blocks import BLOCK, GGUFBlocks
from .int4_cpu import Int4CpuLayout


def quantize_int4(w: torch.Tensor, group_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: float [N, K] -> (codes uint8 [N, K], scales, zeros float32 [N, K/group_size]).

    Asymmetric min/max per group (as GGUF Q4_1): scale = (max - min) / 15, code 0 = min.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = (hi - lo) / 15.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # flat groups: code 0
    codes = torch.round((g - lo[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(n, k), scales, lo + 8.0 * scales


class Int4Linear(QuantLinear):
    """Buffers: qweight uint8 [N, K/2], scales and zeros float32 [N, K/G] (the portable format,
    read by the Triton kernel). On CPU, `finalize` converts to torch's int4pack layout instead:
    `packed` uint8 [N, K/2] and scales_zeros bf16 [K/G, N, 2] (the kernel takes bf16 scales with
    bf16 activations), and drops the portable buffers once `Int4CpuLayout` reads the codes back
    exactly: 0.625 bytes per weight at group 32. Every CPU path (few rows, many rows, embedding
    rows) then dequantizes with the same bf16 scales."""

    scheme = "int4"
    small_m = 192  # kernel 17 vs dequantize 20 ms at 128 rows, 67 vs 42 at 512 (one layer)

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 group_size: int = 32, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, device)
        if in_features % group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size "
                             f"{group_size}")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2,
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, device=device))
        self.register_buffer("packed", None)
        self.register_buffer("scales_zeros", None)
        self.cpu_layout: Int4CpuLayout | None = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int = 32) -> "Int4Linear":
        mod = cls(weight.shape[1], weight.shape[0], bias is not None, group_size, weight.device)
        mod.load_rows(0, weight)
        if bias is not None:
            mod.load_bias(0, bias)
        mod.finalize()
        return mod

    @torch.no_grad()
    def load_rows(self, offset: int, source) -> None:
        if (isinstance(source, GGUFBlocks) and source.qtype == GGMLQuantizationType.Q4_1
                and self.group_size == BLOCK):
            # Same layout: codes and block scales carry over exactly (w = d*q + m).
            codes, d, m = source.q4_1()
            scales, zeros = d, m + 8.0 * d
        else:
            w = source.dequantize() if isinstance(source, GGUFBlocks) else source
            codes, scales, zeros = quantize_int4(w, self.group_size)
        rows = slice(offset, offset + codes.shape[0])
        self.qweight[rows] = pack_int4(codes).to(self.qweight.device)
        self.scales[rows] = scales.to(self.scales.device)
        self.zeros[rows] = zeros.to(self.zeros.device)

    def finalize(self) -> None:
        if self._finalized:
            return
        if self.qweight.device.type == "cpu" and self.out_features % 16 == 0:
            # (torch's CPU packing needs N % 16 == 0; other shapes keep the portable format.)
            codes = unpack_int4(self.qweight)
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.to(torch.int32), 1)
            self.scales_zeros = torch.stack((self.scales.t(), self.zeros.t()), dim=-1).to(
                torch.bfloat16).contiguous()
            layout = Int4CpuLayout(self.out_features, self.in_features)
            if layout.verify(self.packed, codes):
                self.cpu_layout = layout
                self.qweight = self.scales = self.zeros = None
        super().finalize()

    def dequantize_rows(self, rows: torch.Tensor | None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.cpu_layout is None:
            sel = slice(None) if rows is None else rows
            return dequantize_int4(self.qweight[sel], self.scales[sel], self.zeros[sel],
                                   self.group_size, dtype)
        codes = self.cpu_layout.codes(self.packed, rows)  # [R, K]
        sz = self.scales_zeros if rows is None else self.scales_zeros[:, rows]  # [K/G, R, 2]
        sz = sz.float().permute(1, 0, 2)  # [R, K/G, 2]
        w = codes.view(codes.shape[0], -1, self.group_size).float()  # [R, K/G, G]
        w.sub_(8.0).mul_(sz[..., 0:1]).add_(sz[..., 1:2])
        return w.view(codes.shape[0], self.in_features).to(dtype)

    def _cuda_matmul(self, x: torch.Tensor) -> torch.Tensor:
        from services.worker.kernels.quant_matmul import int4_matmul_triton

        return int4_matmul_triton(x, self.qweight, self.scales, self.zeros, self.group_size)

    def _cpu_small_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:  # a shape torch's CPU kernel does not take
            return torch.nn.functional.linear(x, self.dequantize(x.dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed,
                                                          self.group_size, self.scales_zeros)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"
