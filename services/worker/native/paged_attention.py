"""Paged decode attention on CPU (float32) through the C kernel in paged_attention.c.

`paged_decode_attention` checks shapes, dtypes and contiguity, then hands raw pointers to the
kernel; `paged_decode_attention_ref` is the pure-torch reference the tests compare it with.
`available()` says whether the kernel built on this machine; callers fall back to torch when not.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from .build import NativeBuildError, load

logger = logging.getLogger(__name__)

_fn = None
_state: bool | None = None
_lock = threading.Lock()
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _kernel():
    global _fn
    if _fn is None:
        fn = load("paged_attention").paged_decode_attention_f32
        fn.restype = ctypes.c_int
        fn.argtypes = [_PTR] * 6 + [_I64] * 6 + [ctypes.c_float, ctypes.c_int]
        _fn = fn
    return _fn


def available() -> bool:
    """True when the kernel is built and loadable here (tried once per process)."""
    global _state
    with _lock:
        if _state is None:
            try:
                _kernel()
                _state = True
            except NativeBuildError as e:
                logger.warning("native paged attention unavailable, using torch: %s", e)
                _state = False
        return _state


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """One query token per sequence over its paged K/V.

    q: [B, Hq, D] float32; k_cache, v_cache: [NB, BS, Hkv, D] float32 (one layer's halves);
    block_tables: [B, max_blocks] int64; seq_lens: [B] int64, each in [1, max_blocks * BS].
    Returns [B, Hq, D]. Block ids and lengths are trusted (the runner builds them), so they are
    not re-checked element by element here; the reference test covers their meaning.
    """
    b, hq, d = q.shape
    nb, bs, hkv, dk = k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32, "float32 only"
    assert q.device.type == "cpu", "CPU kernel"
    assert v_cache.shape == k_cache.shape and dk == d, (q.shape, k_cache.shape, v_cache.shape)
    assert hq % hkv == 0, f"{hq} query heads do not group over {hkv} KV heads"
    assert block_tables.dtype == seq_lens.dtype == torch.int64
    assert block_tables.dim() == 2 and block_tables.shape[0] == b and seq_lens.shape == (b,)
    for t in (q, k_cache, v_cache, block_tables, seq_lens):
        assert t.is_contiguous(), "kernel inputs must be contiguous"
    out = torch.empty_like(q)
    rc = _kernel()(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   block_tables.data_ptr(), seq_lens.data_ptr(), b, hq, hkv, d, bs,
                   block_tables.shape[1], float(scale), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"shape past the kernel's limits: group {hq // hkv}, head_dim {d}, "
                         f"block_size {bs} (max 16, 256, 64)")
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Pure-torch reference: gather each sequence's rows, then softmax(q k^T * scale) v."""
    _, bs, hkv, d = k_cache.shape
    out = torch.empty_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        blocks = block_tables[i, : (n + bs - 1) // bs]
        k = k_cache[blocks].reshape(-1, hkv, d)[:n]  # [n, Hkv, D]
        v = v_cache[blocks].reshape(-1, hkv, d)[:n]
        g = q.shape[1] // hkv
        k = k.repeat_interleave(g, dim=1).transpose(0, 1)  # [Hq, n, D]
        v = v.repeat_interleave(g, dim=1).transpose(0, 1)
        p = torch.softmax((q[i].unsqueeze(1) @ k.transpose(1, 2)) * scale, dim=-1)  # [Hq, 1, n]
        out[i] = (p @ v).squeeze(1)
    return out
