"""The "triton" attention backend end to end: a tiny random Llama run through the paged cache
(chunked prefill of two sequences, then decode steps) gives the torch backend's logits."""

from __future__ import annotations

import copy

import torch

from services.worker.kernels import attention_backend  # noqa: F401  (registers "triton")
from services.worker.model.attention import get_backend
from services.worker.model.config import ModelConfig
from services.worker.model.loader import build_model

from ..model.paged import PagedSequence, make_kv_caches, paged_step

BLOCK = 8


def _tiny_model() -> tuple[torch.nn.Module, ModelConfig]:
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=96, hidden_size=48,
                      intermediate_size=64, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                      tie_word_embeddings=True)
    model = build_model(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model, cfg


def _run(model, cfg) -> list[torch.Tensor]:
    """Two sequences: prefill in chunks of 7 and 5 (partial blocks), then 3 joint decode steps."""
    caches = make_kv_caches(cfg, 12, BLOCK)
    seqs = [PagedSequence(list(range(3, 17)), [9, 2, 5]), PagedSequence(list(range(40, 49)),
                                                                        [7, 0, 11])]
    logits = [paged_step(model, seqs, [7, 5], caches, BLOCK),
              paged_step(model, seqs, [7, 4], caches, BLOCK)]
    for _ in range(3):
        for s, row in zip(seqs, logits[-1]):
            s.token_ids.append(int(row.argmax()))
        logits.append(paged_step(model, seqs, [1, 1], caches, BLOCK))
    return logits


def test_triton_backend_matches_torch_backend():
    model, cfg = _tiny_model()
    want = _run(model, cfg)
    triton_model = copy.deepcopy(model)
    for layer in triton_model.model.layers:
        layer.self_attn.attn.backend = get_backend("triton")
    got = _run(triton_model, cfg)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_selected_for_cuda_only():
    from services.worker.model.attention import select_backend

    assert select_backend(torch.device("cuda"), torch.bfloat16) == "triton"
    assert select_backend(torch.device("cpu"), torch.float32) != "triton"
