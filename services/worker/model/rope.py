"""Rotary position embedding with the HF "rotate half" layout and a registry of frequency scalings.

GGUF files from llama.cpp's converter store Llama q/k rows permuted for interleaved-pair RoPE; the
GGUF loader undoes that permutation, so one RoPE implementation serves both checkpoint kinds.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from services.worker.native import fused_ops

from .config import ModelConfig, RopeScaling, UnsupportedModel

InvFreqFn = Callable[[torch.Tensor, RopeScaling], torch.Tensor]
_INV_FREQ: dict[str, InvFreqFn] = {}


def _register(name: str) -> Callable[[InvFreqFn], InvFreqFn]:
    def wrap(fn: InvFreqFn) -> InvFreqFn:
        _INV_FREQ[name] = fn
        return fn
    return wrap


@_register("default")
def _default(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    return inv_freq


@_register("linear")
def _linear(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Positions divided by the factor == frequencies divided by it.
    return inv_freq / s.factor


@_register("llama3")
def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given per-token positions.

    The cos/sin table is computed once for every position up to the model's context; a step
    indexes it with the positions tensor, so mixed batches need no per-sequence work.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        fn = _INV_FREQ.get(cfg.rope_scaling.rope_type)
        if fn is None:
            raise UnsupportedModel(
                f"rope type {cfg.rope_scaling.rope_type!r} is not supported; "
                f"supported: {sorted(_INV_FREQ)}"
            )
        self.head_dim = cfg.head_dim
        self.rotary_dim = cfg.rotary_dim or cfg.head_dim
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        inv_freq = fn(1.0 / (cfg.rope_theta ** exponents), cfg.rope_scaling)
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [max_pos, rotary_dim / 2]
        # Plain attributes, not buffers, so `model.to(bfloat16)` leaves them in float32:
        # positions past ~2k lose precision in bf16. Built on the model's device (see loader).
        self.cos = freqs.cos()
        self.sin = freqs.sin()

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the step's positions: ([T, 1, rot/2]) x 2. Done once per forward, shared
        by every layer."""
        return (self.cos.index_select(0, positions).unsqueeze(1),
                self.sin.index_select(0, positions).unsqueeze(1))

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin from `lookup`; q: [T, Hq, D]; k: [T, Hkv, D] -> rotated (q, k)."""
        return self.rotate(cos_sin, q), self.rotate(cos_sin, k)

    def rotate_qk(self, cos_sin: tuple[torch.Tensor, torch.Tensor], qkv: torch.Tensor,
                  num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated q [T, Hq, D] and k [T, Hkv, D] from a fused projection qkv [T, (Hq + 2 Hkv) * D].

        On CPU in float32 one native call writes both as contiguous tensors (what attention
        and the KV write want); elsewhere q and k are views of one rotated [T, Hq + Hkv, D]."""
        d = self.head_dim
        if fused_ops.supports(qkv) and qkv.stride(-1) == 1:
            cos, sin = cos_sin
            return fused_ops.rope_qk(qkv, cos, sin, num_heads, num_kv_heads, d, self.rotary_dim)
        qk = self.rotate(cos_sin, qkv[:, : (num_heads + num_kv_heads) * d].view(
            qkv.shape[0], num_heads + num_kv_heads, d))
        return qk.split([num_heads, num_kv_heads], dim=1)

    def rotate(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Rotates every head of x: [T, H, D] -> [T, H, D]. Callers rotate q and k heads in one
        call where they sit side by side (half the small ops of two calls)."""
        cos, sin = cos_sin
        if x.is_cuda and self.rotary_dim == self.head_dim:  # Triton, in place on the q|k view
            from services.worker.kernels.rope import rotate_heads

            return rotate_heads(x, cos[:, 0], sin[:, 0])
        return _rotate(x, cos, sin, self.rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    dtype = x.dtype
    xr = x[..., :rot].float()
    x1, x2 = xr.chunk(2, dim=-1)
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): the same as HF's x*cos + rotate_half(x)*sin.
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)
