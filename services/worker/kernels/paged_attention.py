"""Paged attention for a mixed step: decode rows, prefill and chunked-prefill chunks, one launch.

Sequence b owns query rows [qsl[b], qsl[b+1]) and has seq_lens[b] tokens of context after this
step, the last q_len of which are its queries (their K/V already written to the cache). Query i of
the chunk sits at position seq_len - q_len + i and attends causally to cache positions 0..that.

Grid: (B, Hkv, query tiles). A program owns BLOCK_Q query tokens of one sequence times the G query
heads that share KV head h (GQA: K/V are loaded once for all G heads), i.e. BLOCK_Q * G_PAD rows
of one tl.dot tile, and streams the sequence's keys BLOCK_N at a time through its block table with
an online softmax. Tiles past a sequence's q_len exit at once, so decode rows of a mixed batch
cost one tile each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import check, require_launchable, tl, triton, upcast_math

LOG2E = 1.4426950408889634


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, qsl_ptr, seq_lens_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_co, stride_ch, stride_bt,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - q_len  # absolute position of the chunk's first query

    # Rows of the tile: (query token, head in group) flattened, BLOCK_M = BLOCK_Q * G_PAD.
    rows = tl.arange(0, BLOCK_Q * G_PAD)
    tok = tile * BLOCK_Q + rows // G_PAD
    head = h * G + rows % G_PAD
    row_ok = (tok < q_len) & (rows % G_PAD < G)
    d = tl.arange(0, D_PAD)
    d_ok = d < D
    rows64 = (q_start + tok).to(tl.int64)[:, None]
    q_off = rows64 * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = first_pos + tok  # [BLOCK_M]

    m_i = tl.full([BLOCK_Q * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * G_PAD, D_PAD], tl.float32)
    # Keys this tile can see: up to its last query's position (causal), within the context.
    kv_len = tl.minimum(seq_len, first_pos + (tile + 1) * BLOCK_Q)
    for n0 in range(0, kv_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        blk = tl.load(block_tables_ptr + b.to(tl.int64) * stride_bt + n // PAGE, mask=n_ok, other=0)
        kv_off = (blk.to(tl.int64)[:, None] * stride_cb + (n % PAGE)[:, None] * stride_co
                  + h * stride_ch + d[None, :])
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2  # base-2 logits
        visible = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        # Every row sees key 0 in the first block, so m_new is finite from there on.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if UPCAST:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    o_off = rows64 * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def _check(q, kv_cache, block_tables, query_start_loc, seq_lens) -> None:
    check(q.dim() == 3 and q.stride(-1) == 1, f"q must be [T, Hq, D] with unit last stride, "
          f"got {tuple(q.shape)} strides {q.stride()}")
    check(kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache[0].is_contiguous(),
          f"kv_cache must be contiguous [2, NB, BS, Hkv, D], got {tuple(kv_cache.shape)}")
    hkv, d = kv_cache.shape[3:]
    check(q.shape[2] == d and q.shape[1] % hkv == 0,
          f"q heads/dim {tuple(q.shape[1:])} do not fit cache heads/dim ({hkv}, {d})")
    check(q.dtype == kv_cache.dtype, f"q is {q.dtype} but the cache is {kv_cache.dtype}")
    b = seq_lens.shape[0]
    check(block_tables.dim() == 2 and block_tables.shape[0] == b and block_tables.stride(1) == 1,
          f"block_tables must be [{b}, max_blocks] with unit last stride, "
          f"got {tuple(block_tables.shape)}")
    check(query_start_loc.shape == (b + 1,), f"query_start_loc must be [{b + 1}], "
          f"got {tuple(query_start_loc.shape)}")
    for name, t in (("block_tables", block_tables), ("query_start_loc", query_start_loc),
                    ("seq_lens", seq_lens)):
        check(t.dtype in (torch.int32, torch.int64), f"{name} must be int32/int64, got {t.dtype}")
        check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")


def paged_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_query_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D]; kv_cache: [2, NB, BS, Hkv, D] holding this step's K/V already;
    block_tables: [B, max_blocks]; query_start_loc: [B + 1]; seq_lens: [B] (device tensors);
    max_query_len: the longest q_len of the step (host int, sizes the grid). Returns [T, Hq, D].
    """
    _check(q, kv_cache, block_tables, query_start_loc, seq_lens)
    require_launchable(q)
    t, hq, d = q.shape
    _, _, page, hkv, _ = kv_cache.shape
    out = torch.empty_like(q) if out is None else out
    check(out.shape == q.shape and out.stride(-1) == 1, "out must be like q")
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    # Decode-only steps need one token per tile; tl.dot wants >= 16 rows on the GPU.
    rows = 16 if max_query_len == 1 else 64
    block_q = max(1, rows // g_pad)
    b = seq_lens.shape[0]
    if t == 0 or b == 0:
        return out
    kc, vc = kv_cache[0], kv_cache[1]
    grid = (b, hkv, triton.cdiv(max_query_len, block_q))
    _paged_attention_kernel[grid](
        q, kc, vc, out, block_tables, query_start_loc, seq_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), block_tables.stride(0),
        G=g, G_PAD=g_pad, D=d, D_PAD=max(16, triton.next_power_of_2(d)), PAGE=page,
        BLOCK_Q=block_q, BLOCK_N=max(16, min(64, triton.next_power_of_2(page))),
        UPCAST=upcast_math(q.dtype), num_warps=4,
    )
    return out


def paged_attention_reference(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                              query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                              max_query_len: int | None = None) -> torch.Tensor:
    """Torch reference: per sequence, gather K/V through the block table and run float32 SDPA
    with the chunk's causal offset. Same arguments as `paged_attention_triton`."""
    _check(q, kv_cache, block_tables, query_start_loc, seq_lens)
    _, _, page, hkv, _ = kv_cache.shape
    g = q.shape[1] // hkv
    out = torch.empty_like(q)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        s, e = qsl[i], qsl[i + 1]
        if e == s:
            continue
        blocks = block_tables[i, : math.ceil(seq_len / page)].long()
        k = kv_cache[0][blocks].flatten(0, 1)[:seq_len].float()  # [L, Hkv, D]
        v = kv_cache[1][blocks].flatten(0, 1)[:seq_len].float()
        k, v = (x.repeat_interleave(g, dim=1).transpose(0, 1) for x in (k, v))  # [Hq, L, D]
        qi = q[s:e].float().transpose(0, 1)  # [Hq, Lq, D]
        mask = torch.ones(e - s, seq_len, dtype=torch.bool, device=q.device).tril(seq_len - (e - s))
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out
