"""Fused add + RMSNorm kernel vs its torch reference, and the reference vs the model's RMSNorm."""

from __future__ import annotations

import pytest
import torch

from services.worker.kernels.rmsnorm import rms_norm, rms_norm_reference, rms_norm_triton
from services.worker.model.layers import RMSNorm

from .conftest import tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 100), (3, 576)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(tokens, hidden, with_residual, dtype):
    gen = torch.Generator().manual_seed(tokens + hidden)
    x = (3 * torch.randn(tokens, hidden, generator=gen)).to(dtype)
    res = torch.randn(tokens, hidden, generator=gen).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    got = rms_norm_triton(x, w, 1e-5, res)
    want = rms_norm_reference(x, w, 1e-5, res)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], **tolerance(dtype))
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **tolerance(dtype))


def test_strided_rows():
    x = torch.randn(5, 128)[:, :64]  # row stride 128
    w = torch.rand(64)
    torch.testing.assert_close(rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6),
                               **tolerance(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_model_layer(dtype):
    """The torch path the dispatcher takes on CPU is the model's own RMSNorm math."""
    layer = RMSNorm(48, 1e-5).to(dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(4, 48).to(dtype), torch.randn(4, 48).to(dtype)
    want_out, want_res = layer(x, r)
    out, res = rms_norm(x, layer.weight.detach(), 1e-5, r)
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res, want_res, atol=0, rtol=0)
