"""Rotary kernel vs its torch reference and the model's RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from services.worker.kernels.rope import rope, rope_reference, rope_triton, rotate_heads
from services.worker.model.config import ModelConfig
from services.worker.model.rope import RotaryEmbedding

from .conftest import tolerance


def _rotary(head_dim: int, rotary_dim: int | None = None) -> RotaryEmbedding:
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=4 * head_dim,
                      intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      rotary_dim=rotary_dim)
    return RotaryEmbedding(cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,hq,hkv,d,rot", [
    (1, 4, 4, 16, None), (9, 9, 3, 64, None), (5, 6, 2, 64, 32), (3, 8, 1, 80, None)])
def test_matches_reference(tokens, hq, hkv, d, rot, dtype):
    gen = torch.Generator().manual_seed(tokens * hq + d)
    rotary = _rotary(d, rot)
    # Strided views of a fused qkv output, as in the model.
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    pos = torch.randint(0, 512, (tokens,), generator=gen)
    want = rope_reference(q, k, pos, rotary.cos, rotary.sin)
    got = rope_triton(q, k, pos, rotary.cos, rotary.sin)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerance(dtype))
    # In place: writes back into the views.
    q2, k2 = q.clone(), k.clone()
    rope_triton(q2, k2, pos.to(torch.int32), rotary.cos, rotary.sin, inplace=True)
    torch.testing.assert_close(q2, want[0], **tolerance(dtype))
    torch.testing.assert_close(k2, want[1], **tolerance(dtype))


def test_torch_path_matches_model_rotary():
    rotary = _rotary(64, 32)
    q, k = torch.randn(6, 4, 64), torch.randn(6, 2, 64)
    pos = torch.tensor([0, 1, 2, 100, 7, 511])
    want = rotary(rotary.lookup(pos), q, k)
    got = rope(q, k, pos, rotary.cos, rotary.sin)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_rotate_heads_with_looked_up_rows():
    """The form the model's RotaryEmbedding hands over: cos/sin rows already per token, q and k
    heads side by side in one view."""
    rotary = _rotary(64)
    pos = torch.tensor([3, 0, 200])
    qk = torch.randn(3, 6, 64)
    cos, sin = rotary.lookup(pos)  # [T, 1, 32] each
    want = rotary.rotate((cos, sin), qk)
    got = rope_triton(qk, qk[:, :0], torch.arange(3), cos[:, 0].contiguous(),
                      sin[:, 0].contiguous())[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rotate_heads(qk.clone(), cos[:, 0], sin[:, 0]), want,
                               atol=1e-6, rtol=1e-6)
