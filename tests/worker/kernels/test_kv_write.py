"""kv_write kernel vs torch scatter: exact, over layouts, block sizes and strided inputs."""

from __future__ import annotations

import pytest
import torch

from services.worker.kernels.kv_write import kv_write, kv_write_reference, kv_write_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,hkv,d,block_size", [
    (1, 1, 16, 1), (7, 3, 64, 16), (13, 2, 80, 8), (5, 4, 32, 32)])
def test_matches_reference(tokens, hkv, d, block_size, dtype):
    gen = torch.Generator().manual_seed(tokens * 100 + d)
    num_blocks = 2 * tokens // block_size + 3
    # Fused qkv output: k and v are strided views, as the model hands them over.
    qkv = torch.randn(tokens, (2 + 2) * hkv * d, generator=gen).to(dtype)
    k = qkv[:, 2 * hkv * d:3 * hkv * d].view(tokens, hkv, d)
    v = qkv[:, 3 * hkv * d:].view(tokens, hkv, d)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    want = cache.clone()
    kv_write_reference(want, k, v, slots)
    kv_write_triton(cache, k, v, slots.to(torch.int32))
    assert torch.equal(cache, want)


def test_dispatch_uses_torch_on_cpu():
    cache = torch.zeros(2, 2, 4, 1, 8)
    k, v = torch.ones(1, 1, 8), torch.full((1, 1, 8), 2.0)
    kv_write(cache, k, v, torch.tensor([5]))
    assert cache[0, 1, 1].eq(1).all() and cache[1, 1, 1].eq(2).all()
    assert cache.sum() == 8 * 3


def test_rejects_bad_layout():
    cache = torch.zeros(2, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="k, v must be"):
        kv_write_triton(cache, torch.zeros(3, 1, 8), torch.zeros(3, 1, 8), torch.arange(3))
    with pytest.raises(ValueError, match="dtypes differ"):
        kv_write_triton(cache, torch.zeros(3, 2, 8, dtype=torch.float16),
                        torch.zeros(3, 2, 8, dtype=torch.float16), torch.arange(3))
