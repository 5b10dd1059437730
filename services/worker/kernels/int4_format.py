"""The portable int4 weight format shared by the Triton kernel, the CPU path and the GGUF loader.

codes (0..15) are packed two to a byte along K, low nibble = even k: qweight uint8 [N, K/2].
Group j = k // group_size has a float32 scale and zero; W[n, k] = (code - 8) * scale + zero,
so `zero` is the value of code 8 (torch's int4pack convention). Pure torch: no triton import.
"""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes (0..15) [N, K] -> uint8 [N, K/2], low nibble = even k."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K]."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).flatten(-2)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight [N, K] from qweight [N, K/2] and scales, zeros [N, K/group_size]."""
    n = qweight.shape[0]
    codes = unpack_int4(qweight).view(n, -1, group_size).to(scales.dtype)  # [N, K/G, G]
    w = (codes - 8.0) * scales[..., None] + zeros[..., None]
    return w.view(n, -1).to(dtype)
