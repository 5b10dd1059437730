"""Paged attention on CPU (float32) through the C kernel in paged_attention.c.

`paged_attention_rows` serves any mix of query rows (decode tokens and prefill chunks: each row
attends to the first `row_len` tokens of its sequence); `paged_decode_attention` is its
one-row-per-sequence form. Both check shapes, dtypes and contiguity, then hand raw pointers to
the kernel; `paged_attention_rows_ref` is the pure-torch reference the tests compare them with.
`available()` says whether the kernel built on this machine; callers fall back to torch when not.
"""

from __future__ import annotations

import ctypes

import torch

from .build import Probe, load


_fn = None
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _kernel():
    global _fn
    if _fn is None:
        fn = load("paged_attention").paged_attention_rows_f32
        fn.restype = ctypes.c_int
        fn.argtypes = [_PTR] * 7 + [_I64] * 6 + [ctypes.c_float, ctypes.c_int]
        _fn = fn
    return _fn


ISA_NAMES = ("scalar", "avx2", "avx512")
"""Code paths of the kernel, in the C enum's order."""


def isa(head_dim: int, block_size: int) -> str:
    """The code path that serves this shape here: "avx512", "avx2" or "scalar"."""
    fn = load("paged_attention").paged_attention_isa
    fn.argtypes, fn.restype = [_I64, _I64], ctypes.c_int
    return ISA_NAMES[fn(head_dim, block_size)]


def set_max_isa(name: str) -> str:
    """Caps the code path for this process (tests cover every path on one machine); returns
    the previous cap. Each path is exact about its own results; they differ in rounding."""
    fn = load("paged_attention").paged_attention_set_max_isa
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return ISA_NAMES[fn(ISA_NAMES.index(name))]


_write = None


def _writer():
    global _write
    if _write is None:
        fn = load("paged_attention").paged_kv_write_f32
        fn.restype = None
        fn.argtypes = [_PTR] * 5 + [_I64] * 4
        _write = fn
    return _write


available = Probe("native paged attention", _kernel)
"""available() -> bool: whether the kernel is built and loadable here (tried once per process)."""


def check_slots(slot_mapping: torch.Tensor, num_slots: int) -> None:
    """Raises IndexError unless every slot is in [0, num_slots): a bad slot would make the
    native write go out of bounds. slot_mapping: [T] int64."""
    assert slot_mapping.dtype == torch.int64 and slot_mapping.dim() == 1
    if slot_mapping.numel() == 0:
        return
    lo, hi = torch.aminmax(slot_mapping)
    if int(lo) < 0 or int(hi) >= num_slots:
        raise IndexError(f"slot_mapping out of range [0, {num_slots}): {int(lo)}..{int(hi)}")


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, *, check: bool = True) -> None:
    """Scatters new K/V rows into the paged cache, as attention.write_kv does.

    kv_cache: [2, NB, BS, Hkv, D] float32 contiguous; k, v: [T, Hkv, D] float32, each row's
    heads contiguous (rows may be strided, e.g. views into the fused qkv projection);
    slot_mapping: [T] int64 flat slots in [0, NB * BS). `check=False` skips the range check for
    callers that ran `check_slots` on this slot_mapping already (once per step, not per layer).
    """
    _, nb, bs, hkv, d = kv_cache.shape
    t = slot_mapping.shape[0]
    assert kv_cache.dtype == k.dtype == v.dtype == torch.float32, "float32 only"
    assert kv_cache.is_contiguous() and slot_mapping.dtype == torch.int64
    assert slot_mapping.is_contiguous()
    assert k.shape == v.shape == (t, hkv, d), (k.shape, v.shape, kv_cache.shape)
    if t == 0:
        return
    if check:
        check_slots(slot_mapping, nb * bs)
    if k.stride()[1:] != (d, 1):
        k = k.contiguous()
    if v.stride()[1:] != (d, 1):
        v = v.contiguous()
    _writer()(kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), k.data_ptr(), v.data_ptr(),
              slot_mapping.data_ptr(), t, hkv * d, k.stride(0), v.stride(0))


def _check(q, k_cache, v_cache, block_tables):
    _, hq, d = q.shape
    _, _, hkv, dk = k_cache.shape
    assert q.dtype == k_cache.dtype == v_cache.dtype == torch.float32, "float32 only"
    assert q.device.type == "cpu", "CPU kernel"
    assert v_cache.shape == k_cache.shape and dk == d, (q.shape, k_cache.shape, v_cache.shape)
    assert hq % hkv == 0, f"{hq} query heads do not group over {hkv} KV heads"
    assert block_tables.dtype == torch.int64 and block_tables.dim() == 2


def _run(q, k_cache, v_cache, block_tables, row_table, row_len, scale, out):
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    for x in (q, k_cache, v_cache, block_tables, row_len,
              *(() if row_table is None else (row_table,))):
        assert x.is_contiguous(), "kernel inputs must be contiguous"
    if out is None:
        out = torch.empty_like(q)
    else:
        assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    rc = _kernel()(out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   block_tables.data_ptr(), None if row_table is None else row_table.data_ptr(),
                   row_len.data_ptr(), t, hq, hkv, d, bs, block_tables.shape[1], float(scale),
                   torch.get_num_threads())
    if rc == 2:
        raise MemoryError("paged attention: no memory for the per-thread scratch")
    if rc != 0:
        raise ValueError(f"shape past the kernel's limits: group {hq // hkv}, head_dim {d}, "
                         f"block_size {bs} (max 16, 256, 64)")
    return out


def paged_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, row_table: torch.Tensor,
                         row_len: torch.Tensor, scale: float,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """Each query row over the first row_len tokens of its sequence's paged K/V.

    q: [T, Hq, D] float32; k_cache, v_cache: [NB, BS, Hkv, D] float32 (one layer's halves);
    block_tables: [S, max_blocks] int64; row_table: [T] int64, each row's sequence (a row of
    block_tables); row_len: [T] int64, each in [1, max_blocks * BS]. A prefill chunk's token at
    position p has row_len p + 1 (causal attention within the chunk, its K/V already written).
    Returns [T, Hq, D] (`out` when given). Table rows and lengths are trusted (the runner builds
    them), so they are not re-checked element by element here.
    """
    _check(q, k_cache, v_cache, block_tables)
    assert row_table.dtype == row_len.dtype == torch.int64
    assert row_table.shape == row_len.shape == q.shape[:1], (row_table.shape, row_len.shape)
    return _run(q, k_cache, v_cache, block_tables, row_table, row_len, scale, out)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence over its paged K/V (row i reads table row i).

    q: [B, Hq, D]; block_tables: [B, max_blocks] int64; seq_lens: [B] int64, each in
    [1, max_blocks * BS]; otherwise as `paged_attention_rows`.
    """
    _check(q, k_cache, v_cache, block_tables)
    assert seq_lens.dtype == torch.int64
    assert block_tables.shape[0] == q.shape[0] and seq_lens.shape == q.shape[:1]
    return _run(q, k_cache, v_cache, block_tables, None, seq_lens, scale, out)


def paged_attention_rows_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, row_table: torch.Tensor,
                             row_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Pure-torch reference of `paged_attention_rows`, one row at a time."""
    return torch.cat([
        paged_decode_attention_ref(q[i:i + 1], k_cache, v_cache,
                                   block_tables[row_table[i]:row_table[i] + 1], row_len[i:i + 1],
                                   scale)
        for i in range(q.shape[0])]) if q.shape[0] else torch.empty_like(q)


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
