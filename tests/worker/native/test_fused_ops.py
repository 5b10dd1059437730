"""The native fused ops (residual add + RMSNorm, SwiGLU, RoPE) against their torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.worker.model.config import ModelConfig
from services.worker.model.layers import RMSNorm, SiluAndMul
from services.worker.model.rope import RotaryEmbedding, _rotate
from services.worker.native import fused_ops as fo

# 1 and 7 rows run on the calling thread, 8 and more are split over threads.
ROWS = (1, 7, 8, 33)


@pytest.fixture(autouse=True)
def _native():
    assert fo.available(), "the README requires a C compiler; the kernels must build here"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", ROWS)
def test_add_rms_norm_matches_torch(rows):
    g = _gen(rows)
    x, res = torch.randn(rows, 576, generator=g), torch.randn(rows, 576, generator=g)
    w = torch.randn(576, generator=g)
    x0, res0 = x.clone(), res.clone()
    out, new_res = fo.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(new_res, x0 + res0, rtol=0, atol=0)
    torch.testing.assert_close(out, F.rms_norm(x0 + res0, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
    plain = fo.add_rms_norm(x, None, w, 1e-5)
    torch.testing.assert_close(plain, F.rms_norm(x0, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0) and torch.equal(res, res0), "inputs must not be modified"


@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_matches_torch(rows):
    x = torch.randn(rows, 2 * 1536, generator=_gen(rows)) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(fo.silu_and_mul(x), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def _rope(head_dim: int, rotary_dim: int | None) -> RotaryEmbedding:
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=9 * head_dim,
                      intermediate_size=64, num_layers=1, num_heads=9, num_kv_heads=3,
                      head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      rotary_dim=rotary_dim)
    return RotaryEmbedding(cfg)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, None), (64, 32), (48, 16)])
def test_rope_matches_torch(rows, head_dim, rotary_dim):
    rope = _rope(head_dim, rotary_dim)
    g = _gen(rows * head_dim)
    qkv = torch.randn(rows, (9 + 2 * 3) * head_dim, generator=g)  # q | k | v
    positions = torch.randint(0, 4096, (rows,), generator=g)
    cos, sin = rope.lookup(positions)
    q, k = fo.rope_qk(qkv, cos, sin, 9, 3, head_dim, rope.rotary_dim)
    assert q.is_contiguous() and k.is_contiguous()
    ref = _rotate(qkv[:, : 12 * head_dim].view(rows, 12, head_dim), cos, sin, rope.rotary_dim)
    torch.testing.assert_close(q, ref[:, :9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, ref[:, 9:], rtol=1e-5, atol=1e-5)
    # the module entry point takes the same path
    q2, k2 = rope.rotate_qk((cos, sin), qkv, 9, 3)
    assert torch.equal(q2, q) and torch.equal(k2, k)


def test_a_rows_result_does_not_depend_on_the_batch():
    """Batch invariance: row i computed alone is bitwise the row computed among 33, whichever
    thread split the batch took."""
    g = _gen(11)
    x, res, w = (torch.randn(33, 576, generator=g), torch.randn(33, 576, generator=g),
                 torch.randn(576, generator=g))
    gu = torch.randn(33, 3072, generator=g)
    rope = _rope(64, None)
    qkv = torch.randn(33, 15 * 64, generator=g)
    cos, sin = rope.lookup(torch.randint(0, 4096, (33,), generator=g))
    batch_norm, _ = fo.add_rms_norm(x, res, w, 1e-5)
    batch_act = fo.silu_and_mul(gu)
    batch_q, batch_k = fo.rope_qk(qkv, cos, sin, 9, 3, 64, 64)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for i in (0, 16, 32):
                s = slice(i, i + 1)
                assert torch.equal(fo.add_rms_norm(x[s], res[s], w, 1e-5)[0], batch_norm[s])
                assert torch.equal(fo.silu_and_mul(gu[s]), batch_act[s])
                q, k = fo.rope_qk(qkv[s], cos[s], sin[s], 9, 3, 64, 64)
                assert torch.equal(q, batch_q[s]) and torch.equal(k, batch_k[s])
    finally:
        torch.set_num_threads(before)


def test_layers_use_the_native_path_for_float32_on_cpu():
    norm, act = RMSNorm(576, 1e-5), SiluAndMul()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=_gen(3)))
    x, res = torch.randn(4, 576), torch.randn(4, 576)
    out, new_res = norm(x, res)
    native_out, _ = fo.add_rms_norm(x, res, norm.weight, 1e-5)
    assert torch.equal(out, native_out)
    torch.testing.assert_close(out, norm._norm(x + res), rtol=1e-5, atol=1e-5)
    gu = torch.randn(4, 64)
    assert torch.equal(act(gu), fo.silu_and_mul(gu))
    # bfloat16 stays on torch (the kernels are float32 only)
    assert not fo.supports(x.bfloat16())
    xb, rb = x.bfloat16(), res.bfloat16()
    torch.testing.assert_close(norm.bfloat16()(xb, rb)[1], xb + rb)


def test_bad_layouts_are_refused():
    with pytest.raises(AssertionError):
        fo.add_rms_norm(torch.randn(4, 8).t(), None, torch.randn(4), 1e-5)
    with pytest.raises(AssertionError):
        fo.silu_and_mul(torch.randn(4, 7))
    with pytest.raises(AssertionError):
        fo.add_rms_norm(torch.randn(4, 8, dtype=torch.float64), None, torch.randn(8), 1e-5)
