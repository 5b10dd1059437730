"""Writing the step's new K/V rows into the paged cache by slot mapping.

Cache layout (per layer): kv_cache [2, num_blocks, block_size, Hkv, D], K then V;
slot = block_id * block_size + offset. One program copies one token's K and V rows.

`kv_write` is the engine's entry point: the Triton kernel on CUDA, the torch reference elsewhere.
"""

from __future__ import annotations

import torch

from ._triton import check, require_launchable, tl, triton, use_triton


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cb, stride_co, stride_ch, stride_cd,
    BLOCK_SIZE: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    HKV_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, HKV_PAD)[:, None]  # [HKV_PAD, 1]
    d = tl.arange(0, D_PAD)[None, :]  # [1, D_PAD]
    mask = (h < HKV) & (d < D)
    dst = blk * stride_cb + off * stride_co + h * stride_ch + d * stride_cd
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def _check(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           slot_mapping: torch.Tensor) -> None:
    check(kv_cache.dim() == 5 and kv_cache.shape[0] == 2,
          f"kv_cache must be [2, NB, BS, Hkv, D], got {tuple(kv_cache.shape)}")
    hkv, d = kv_cache.shape[3:]
    check(k.dim() == 3 and tuple(k.shape[1:]) == (hkv, d) and k.shape == v.shape,
          f"k, v must be [T, {hkv}, {d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    check(k.dtype == v.dtype == kv_cache.dtype,
          f"dtypes differ: k {k.dtype}, v {v.dtype}, cache {kv_cache.dtype}")
    check(slot_mapping.shape == (k.shape[0],) and slot_mapping.dtype in (torch.int32, torch.int64),
          f"slot_mapping must be int32/int64 [{k.shape[0]}], got {slot_mapping.dtype} "
          f"{tuple(slot_mapping.shape)}")
    check(kv_cache[0].is_contiguous(), "each cache half must be contiguous")
    check(k.device == v.device == kv_cache.device == slot_mapping.device,
          "k, v, kv_cache and slot_mapping must be on one device")


def kv_write_triton(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Scatters k, v [T, Hkv, D] into kv_cache [2, NB, BS, Hkv, D] at slot_mapping [T].

    k and v may be strided views (splits of a fused qkv output); each cache half must be
    contiguous and in k's dtype.
    """
    _check(kv_cache, k, v, slot_mapping)
    require_launchable(kv_cache)
    if k.shape[0] == 0:
        return
    _, _, bs, hkv, d = kv_cache.shape
    kc, vc = kv_cache[0], kv_cache[1]
    _kv_write_kernel[(k.shape[0],)](
        k, v, slot_mapping, kc, vc,
        *k.stride(), *v.stride(), *kc.stride(),
        BLOCK_SIZE=bs, HKV=hkv, D=d,
        HKV_PAD=triton.next_power_of_2(hkv), D_PAD=triton.next_power_of_2(d),
    )


def kv_write_reference(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Torch reference: the same scatter through flat [NB*BS, Hkv, D] views."""
    _, nb, bs, hkv, d = kv_cache.shape
    kv_cache[0].view(nb * bs, hkv, d)[slot_mapping.long()] = k
    kv_cache[1].view(nb * bs, hkv, d)[slot_mapping.long()] = v


def kv_write(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Triton on CUDA, the torch reference elsewhere (same contract as `kv_write_triton`)."""
    if use_triton(kv_cache):
        kv_write_triton(kv_cache, k, v, slot_mapping)
    else:
        _check(kv_cache, k, v, slot_mapping)
        kv_write_reference(kv_cache, k, v, slot_mapping)
