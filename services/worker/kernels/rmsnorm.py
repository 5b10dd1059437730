"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.

fused_add_rms_norm(x, residual, w): s = x + residual (rounded to x's dtype, as the unfused torch
code does); returns (rms_norm(s) * w, s). The norm is computed in float32 and rounded to x's
dtype before the weight multiply, matching `services/worker/model/layers.RMSNorm`.
One program normalizes one row.
"""

from __future__ import annotations

import torch

from ._triton import check, require_launchable, tl, triton, use_triton


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the activation dtype first: the unfused code keeps it in that dtype.
        s = (x + r).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    check(x.dim() == 2 and x.stride(-1) == 1, f"x must be [T, H] with unit last stride, got "
          f"shape {tuple(x.shape)} strides {x.stride()}")
    check(weight.shape == (x.shape[1],) and weight.is_contiguous(),
          f"weight must be contiguous [{x.shape[1]}], got {tuple(weight.shape)}")
    if residual is not None:
        check(residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1,
              f"residual must match x ({tuple(x.shape)}, {x.dtype}), got "
              f"{tuple(residual.shape)}, {residual.dtype}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None):
    """x, residual: [T, H]; weight: [H]. Returns normed [T, H], or (normed, x + residual)."""
    _check(x, residual, weight)
    require_launchable(x)
    t, h = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    if t:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(t,)](
            x, residual if residual is not None else x, weight, out, res_out,
            x.stride(0), (residual if residual is not None else x).stride(0), out.stride(0),
            res_out.stride(0), h, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 8),
        )
    return out if residual is None else (out, res_out)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None):
    """Torch reference with the same rounding points as the kernel."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = (normed.float() * weight.float()).to(x.dtype)
    return out if residual is None else (out, x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None):
    """Triton on CUDA, the torch reference elsewhere (same contract as `rms_norm_triton`)."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    _check(x, residual, weight)
    return rms_norm_reference(x, weight, eps, residual)
