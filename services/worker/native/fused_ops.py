"""Fused residual-add + RMSNorm, SwiGLU and RoPE for float32 on CPU (fused_ops.c via ctypes).

Each function checks dtypes, shapes and layout, allocates its outputs and hands raw pointers to
the kernel. `available()` says whether the library built here; the layers fall back to their
torch code when it did not. ctypes releases the GIL for the call, as torch ops do.
"""

from __future__ import annotations

import ctypes

import torch

from .build import Probe, load


_I64, _PTR, _F32, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "add_rms_norm_f32": [_PTR] * 5 + [_I64] * 2 + [_F32, _INT],
    "silu_and_mul_f32": [_PTR] * 2 + [_I64] * 2 + [_INT],
    "rope_qk_f32": [_PTR] * 5 + [_I64] * 6 + [_INT],
}
_fns: dict[str, ctypes._CFuncPtr] = {}


def _load() -> None:
    lib = load("fused_ops")
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
        _fns[name] = fn


available = Probe("native fused ops", _load)
"""available() -> bool: whether the library is built and loadable here (tried once per process)."""


def supports(x: torch.Tensor) -> bool:
    """Whether the native ops serve tensors like x (float32 on CPU, library built)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        assert t.dtype == torch.float32 and t.device.type == "cpu", (t.dtype, t.device)
        assert t.is_contiguous(), "native fused ops take contiguous tensors"


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (residual None) -> normed; else of s = x + residual -> (normed(s), s).

    x, residual: [..., H]; weight: [H]. Inputs are not modified.
    """
    h = weight.shape[0]
    _check(x, weight, *(() if residual is None else (residual,)))
    assert x.shape[-1] == h and (residual is None or residual.shape == x.shape), (
        x.shape, None if residual is None else residual.shape, weight.shape)
    rows = x.numel() // h
    out = torch.empty_like(x)
    new_res = None if residual is None else torch.empty_like(x)
    _fns["add_rms_norm_f32"](
        out.data_ptr(), None if new_res is None else new_res.data_ptr(), x.data_ptr(),
        None if residual is None else residual.data_ptr(), weight.data_ptr(), rows, h,
        float(eps), torch.get_num_threads())
    return out if new_res is None else (out, new_res)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU over a fused [gate | up] projection: [..., 2I] -> [..., I]."""
    _check(x)
    assert x.shape[-1] % 2 == 0, f"last dim {x.shape[-1]} is not [gate | up]"
    inter = x.shape[-1] // 2
    out = x.new_empty(*x.shape[:-1], inter)
    _fns["silu_and_mul_f32"](out.data_ptr(), x.data_ptr(), x.numel() // (2 * inter), inter,
                             torch.get_num_threads())
    return out


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
            num_kv_heads: int, head_dim: int, rotary_dim: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated q [T, Hq, D] and k [T, Hkv, D] (new, contiguous) from the fused projection.

    qkv: [T, >= (Hq + Hkv) * D] with unit stride along the last dim (rows may be padded, e.g.
    with v after k); cos, sin: [T, ..., rotary_dim / 2] contiguous, the rows' positions looked up.
    """
    t = qkv.shape[0]
    assert qkv.dim() == 2 and qkv.stride(1) == 1, (qkv.shape, qkv.stride())
    assert qkv.shape[1] >= (num_heads + num_kv_heads) * head_dim
    assert qkv.dtype == torch.float32 and qkv.device.type == "cpu"
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, (rotary_dim, head_dim)
    _check(cos, sin)
    assert cos.shape == sin.shape and cos.numel() == t * (rotary_dim // 2), (
        cos.shape, t, rotary_dim)
    q = qkv.new_empty(t, num_heads, head_dim)
    k = qkv.new_empty(t, num_kv_heads, head_dim)
    _fns["rope_qk_f32"](q.data_ptr(), k.data_ptr(), qkv.data_ptr(), cos.data_ptr(),
                        sin.data_ptr(), t, qkv.stride(0), num_heads, num_kv_heads, head_dim,
                        rotary_dim, torch.get_num_threads())
    return q, k
