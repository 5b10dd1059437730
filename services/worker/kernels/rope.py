"""Rotary position embedding ("rotate half" layout) applied to q and k in one launch.

For the first `rot` dims of each head, halves x1 = x[:rot/2], x2 = x[rot/2:rot] become
(x1 cos - x2 sin, x2 cos + x1 sin) with cos/sin looked up at the token's position (float32
tables [max_pos, rot/2], as `services/worker/model/rope.RotaryEmbedding` holds them); dims past
`rot` pass through. One program rotates every q and k head of one token.

`rotate_heads` serves callers that look cos/sin up once per step (the model's
`RotaryEmbedding.lookup`) and rotate q and k heads lying side by side in one [T, H, D] view.
"""

from __future__ import annotations

import torch

from ._triton import check, require_launchable, tl, triton, use_triton


@triton.jit
def _rotate_heads(x_ptr, o_ptr, stride_xt, stride_xh, stride_ot, stride_oh, t, cos, sin,
                  H: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr,
                  HALF_PAD: tl.constexpr):
    h = tl.arange(0, H_PAD)[:, None]  # [H_PAD, 1]
    i = tl.arange(0, HALF_PAD)[None, :]  # [1, HALF_PAD]
    mask = (h < H) & (i < HALF)
    src = x_ptr + t * stride_xt + h * stride_xh + i
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = o_ptr + t * stride_ot + h * stride_oh + i
    tl.store(dst, (x1 * cos - x2 * sin).to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_cos,
    HQ: tl.constexpr, HQ_PAD: tl.constexpr, HKV: tl.constexpr, HKV_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_ptr + pos * stride_cos + i, mask=i < HALF, other=0.0)  # [1, HALF_PAD]
    sin = tl.load(sin_ptr + pos * stride_cos + i, mask=i < HALF, other=0.0)
    _rotate_heads(q_ptr, qo_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, t, cos, sin,
                  HQ, HQ_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr, ko_ptr, stride_kt, stride_kh, stride_kot, stride_koh, t, cos, sin,
                  HKV, HKV_PAD, HALF, HALF_PAD)


def _check(q, k, positions, cos, sin) -> int:
    check(q.dim() == 3 and k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2],
          f"q must be [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    check(q.stride(-1) == 1 and k.stride(-1) == 1, "q and k need a unit stride on head_dim")
    check(q.dtype == k.dtype, f"q is {q.dtype} but k is {k.dtype}")
    check(positions.shape == (q.shape[0],) and positions.dtype in (torch.int32, torch.int64),
          f"positions must be int32/int64 [{q.shape[0]}], got {positions.dtype} "
          f"{tuple(positions.shape)}")
    check(cos.shape == sin.shape and cos.dim() == 2 and cos.dtype == sin.dtype == torch.float32
          and cos.is_contiguous() and sin.is_contiguous(),
          f"cos/sin must be contiguous float32 [max_pos, rot/2], got {tuple(cos.shape)} "
          f"{cos.dtype}")
    rot = 2 * cos.shape[1]
    check(rot <= q.shape[2], f"rotary dims {rot} exceed head_dim {q.shape[2]}")
    return rot


def rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, Hq, D], k: [T, Hkv, D] (strided views allowed); positions [T]; cos, sin
    [max_pos, rot/2] float32. Returns rotated (q, k): new tensors, or q and k themselves."""
    rot = _check(q, k, positions, cos, sin)
    require_launchable(q)
    qo, ko = (q, k) if inplace else (torch.empty_like(q), torch.empty_like(k))
    if not inplace and rot < q.shape[2]:  # pass-through dims (partial rotary)
        qo[..., rot:] = q[..., rot:]
        ko[..., rot:] = k[..., rot:]
    if q.shape[0]:
        half = rot // 2
        _rope_kernel[(q.shape[0],)](
            q, k, qo, ko, positions, cos, sin,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos.stride(0),
            HQ=q.shape[1], HQ_PAD=max(1, triton.next_power_of_2(q.shape[1])),
            HKV=k.shape[1], HKV_PAD=max(1, triton.next_power_of_2(k.shape[1])),
            HALF=half, HALF_PAD=triton.next_power_of_2(half),
        )
    return qo, ko


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = 2 * cos.shape[-1]
    x1, x2 = x[..., :rot].float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return torch.cat((out, x[..., rot:]), dim=-1)


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference (float32 math, rounded once to the input dtype)."""
    c = cos.index_select(0, positions.long()).unsqueeze(1)  # [T, 1, rot/2]
    s = sin.index_select(0, positions.long()).unsqueeze(1)
    qo, ko = _rotate_reference(q, c, s), _rotate_reference(k, c, s)
    if inplace:
        q.copy_(qo)
        k.copy_(ko)
        return q, k
    return qo, ko


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton on CUDA, the torch reference elsewhere (same contract as `rope_triton`)."""
    if use_triton(q):
        return rope_triton(q, k, positions, cos, sin, inplace)
    _check(q, k, positions, cos, sin)
    return rope_reference(q, k, positions, cos, sin, inplace)


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 inplace: bool = True) -> torch.Tensor:
    """x: [T, H, D] (e.g. the q and k heads of a fused qkv output, side by side); cos, sin:
    [T, rot/2] float32, already looked up for each token. Triton on CUDA, torch elsewhere."""
    t = x.shape[0]
    rows = torch.arange(t, device=x.device)  # cos/sin row i belongs to token i
    none = x[:, :0]  # no separate k heads
    if use_triton(x):
        return rope_triton(x, none, rows, cos.contiguous(), sin.contiguous(), inplace)[0]
    return rope_reference(x, none, rows, cos, sin, inplace)[0]
