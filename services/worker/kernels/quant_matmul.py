"""Weight-only quantized matmuls that dequantize inside the kernel: y = x @ W^T.

int8, per output channel: W = q * scale[n]; q int8 [N, K], scale float32 [N]. The scale is
constant along K, so it is applied once to the accumulated dot product.

int4, group-wise with zero points: for k in group j = k // group_size,
W[n, k] = (q[n, k] - 8) * scales[n, j] + zeros[n, j]. Codes q in 0..15 are packed two to a byte
along K (low nibble = even k): qweight uint8 [N, K/2]; scales, zeros float32 [N, K/group_size].
`zeros` is the value of code 8 (as in torch's int4pack), which expresses both an integer zero
point z (zeros = (8 - z) * scale) and GGUF Q4_1's minimum m (zeros = m + 8 * scale) exactly.
The format itself (packing, dequantization) lives in int4_format.py, which needs no triton.

Grid: (M tiles, N tiles); each program loops over K. BLOCK_K divides group_size, so a K tile
sits inside one group and needs one scale/zero per output channel.
"""

from __future__ import annotations

import torch

from ._triton import check, require_launchable, tl, triton, upcast_math
from .int4_format import dequantize_int4

INT4_GROUP_SIZES = (32, 64, 128)


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        x = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + n.to(tl.int64)[:, None] * stride_wn + k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_N, BLOCK_K] int8
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    scale = tl.load(scale_ptr + n, mask=n_ok, other=0.0)
    out = acc * scale[None, :]
    tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_matmul_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K is a multiple of GROUP, GROUP of BLOCK_K
        k = k0 + kk
        x = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + k[None, :],
                    mask=m_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        # Each byte holds codes k (low nibble) and k + 1 (high); load it once per code.
        packed = tl.load(qw_ptr + n.to(tl.int64)[:, None] * stride_qn + (k // 2)[None, :],
                         mask=n_ok[:, None], other=0)  # [BLOCK_N, BLOCK_K] uint8
        codes = ((packed >> ((k % 2) * 4)[None, :]) & 0xF).to(tl.float32)
        j = k0 // GROUP
        scale = tl.load(scales_ptr + n.to(tl.int64) * stride_sn + j, mask=n_ok, other=0.0)
        zero = tl.load(zeros_ptr + n.to(tl.int64) * stride_sn + j, mask=n_ok, other=0.0)
        w = (codes - 8.0) * scale[:, None] + zero[:, None]  # [BLOCK_N, BLOCK_K] float32
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _block_m(m: int) -> int:
    # tl.dot needs >= 16 rows on the GPU; decode (M = batch) rarely needs more than 64.
    return min(64, max(16, triton.next_power_of_2(m)))


def _check_x(x: torch.Tensor, k: int) -> None:
    check(x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1,
          f"x must be [M, {k}] with unit last stride, got {tuple(x.shape)} strides {x.stride()}")
    check(x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x dtype {x.dtype}")


def check_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    check(qweight.dtype == torch.int8 and qweight.dim() == 2 and qweight.is_contiguous(),
          f"qweight must be contiguous int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape
    check(scale.shape == (n,) and scale.dtype == torch.float32 and scale.is_contiguous(),
          f"scale must be contiguous float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    _check_x(x, k)


def int8_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [M, K] float; qweight: int8 [N, K]; scale: float32 [N] -> [M, N] in x's dtype."""
    check_int8(x, qweight, scale)
    require_launchable(x)
    m, (n, k) = x.shape[0], qweight.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = _block_m(m), 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](x, qweight, scale, out, m, n, k, x.stride(0), qweight.stride(0),
                              out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              UPCAST=upcast_math(x.dtype))
    return out


def int8_matmul_reference(x: torch.Tensor, qweight: torch.Tensor,
                          scale: torch.Tensor) -> torch.Tensor:
    """Torch reference: dequantize to float32, matmul, round to x's dtype."""
    return (x.float() @ (qweight.float() * scale[:, None]).t()).to(x.dtype)


def check_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int) -> None:
    check(group_size in INT4_GROUP_SIZES, f"group_size must be one of {INT4_GROUP_SIZES}, "
          f"got {group_size}")
    check(qweight.dtype == torch.uint8 and qweight.dim() == 2 and qweight.is_contiguous(),
          f"qweight must be contiguous uint8 [N, K/2], got {qweight.dtype} {tuple(qweight.shape)}")
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    check(k % group_size == 0, f"K={k} is not a multiple of group_size {group_size}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        check(t.shape == (n, k // group_size) and t.dtype == torch.float32 and t.is_contiguous(),
              f"{name} must be contiguous float32 [{n}, {k // group_size}], got {t.dtype} "
              f"{tuple(t.shape)}")
    _check_x(x, k)


def int4_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x: [M, K] float; qweight: uint8 [N, K/2]; scales, zeros: float32 [N, K/group_size]
    -> [M, N] in x's dtype."""
    check_int4(x, qweight, scales, zeros, group_size)
    require_launchable(x)
    m, n, k = x.shape[0], qweight.shape[0], x.shape[1]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = _block_m(m), 64, min(64, group_size)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](x, qweight, scales, zeros, out, m, n, k, x.stride(0),
                              qweight.stride(0), scales.stride(0), out.stride(0),
                              GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              UPCAST=upcast_math(x.dtype))
    return out


def int4_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Torch reference: dequantize to float32, matmul, round to x's dtype."""
    return (x.float() @ dequantize_int4(qweight, scales, zeros, group_size).t()).to(x.dtype)
