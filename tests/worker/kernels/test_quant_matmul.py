"""Weight-only int8 / int4 matmul kernels vs dequantize-then-matmul references."""

from __future__ import annotations

import pytest
import torch

from services.worker.kernels.int4_format import dequantize_int4, pack_int4, unpack_int4
from services.worker.kernels.quant_matmul import (
    int4_matmul_reference,
    int4_matmul_triton,
    int8_matmul_reference,
    int8_matmul_triton,
)

from .conftest import tolerance

SHAPES = [(1, 96, 128), (5, 70, 256), (33, 64, 384)]  # (M, N, K): decode row, odd N, M > 32


def _rel_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # Sums over K amplify per-element rounding; compare against the output's scale.
    tol = tolerance(dtype)
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=tol["atol"] * scale,
                               rtol=tol["rtol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    s = torch.rand(n, generator=gen) * 0.01
    _rel_close(int8_matmul_triton(x, q, s), int8_matmul_reference(x, q, s), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4(m, n, k, group, dtype):
    if k % group:
        pytest.skip("K must be a multiple of the group")
    gen = torch.Generator().manual_seed(m * n + group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    qw = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) * 0.02
    zeros = torch.randn(n, k // group, generator=gen) * 0.01
    _rel_close(int4_matmul_triton(x, qw, scales, zeros, group),
               int4_matmul_reference(x, qw, scales, zeros, group), dtype)


def test_int4_packing_round_trip():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    w = dequantize_int4(pack_int4(codes), torch.ones(3, 2), torch.zeros(3, 2), 32)
    assert torch.equal(w, codes.float() - 8)


def test_int4_rejects_bad_group():
    x = torch.zeros(1, 64)
    with pytest.raises(ValueError, match="group_size"):
        int4_matmul_triton(x, torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 4),
                           torch.zeros(4, 4), 16)
