"""SmolLM2-135M-Instruct (GGUF, Q4_1/Q8_0 dequantized to float32) against HF transformers.

transformers loads the same GGUF file (`gguf_file=`), dequantizes it and un-permutes q/k itself,
so both sides see identical float32 weights; any difference is in the forward pass.
"""

from __future__ import annotations

import time

import pytest
import torch

from services.common.assets import smollm2_gguf_path
from services.worker.model.attention import AttentionMetadata, forward_context
from services.worker.model.loader import load_model

from .paged import paged_greedy

pytestmark = pytest.mark.slow

CHATS = [
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "List three primary colors.",
    "Explain what a hash table is in two sentences.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a haiku about autumn leaves.",
    "Write a Python function that reverses a string.",
    "Who wrote Romeo and Juliet?",
    "Summarize the plot of Cinderella in one line.",
]


@pytest.fixture(scope="module")
def ours():
    return load_model(smollm2_gguf_path())


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _prompt_ids(ours, text: str) -> list[int]:
    tok = ours.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


@torch.no_grad()
def _our_logits(ours, ids: list[int]) -> torch.Tensor:
    with forward_context(AttentionMetadata.for_prefill([len(ids)])):
        hidden = ours.model(torch.tensor(ids), torch.arange(len(ids)))
    return ours.model.compute_logits(hidden)


@torch.no_grad()
def _ref_greedy(model, ids: list[int], max_new: int) -> list[int]:
    """Greedy with HF's own KV cache, never stopping at EOS (we compare all max_new tokens)."""
    out = model(torch.tensor([ids]), use_cache=True)
    past, generated = out.past_key_values, []
    for _ in range(max_new):
        tok = int(out.logits[0, -1].argmax())
        generated.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return generated


def test_config_read_from_gguf(ours):
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.rope_theta) == (49152, 1536, 100000.0)
    assert c.tie_word_embeddings and c.architecture == "LlamaForCausalLM"
    # Tied head: the LM head computes hidden @ embedding^T (packed separately for oneDNN).
    h = torch.randn(2, 576)
    with torch.no_grad():
        want = h @ ours.model.model.embed_tokens.weight.T
        assert torch.allclose(ours.model.compute_logits(h), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text", CHATS[:4] + ["The quick brown fox jumps over the lazy dog. " * 8])
def test_logits_match_transformers(ours, reference, text):
    ids = _prompt_ids(ours, text) if text in CHATS else ours.tokenizer.encode(text)
    got = _our_logits(ours, ids)
    with torch.no_grad():
        want = reference(torch.tensor([ids])).logits[0].float()
    rel = ((got - want).norm() / want.norm()).item()
    max_abs = (got - want).abs().max().item()
    print(f"{len(ids)} tokens: rel {rel:.2e}, max abs {max_abs:.2e}")
    assert rel <= 1e-4, (rel, max_abs)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("text", CHATS[:8])
def test_greedy_32_tokens_identical(ours, reference, text):
    ids = _prompt_ids(ours, text)
    want = _ref_greedy(reference, ids, 32)
    # Ours runs through the paged KV cache with a chunked prefill (chunks of 16 tokens).
    got = paged_greedy(ours.model, ours.config, ids, 32, block_size=16, prefill_chunk=16)
    assert got == want


def test_capital_of_france_mentions_paris(ours):
    ids = _prompt_ids(ours, "What is the capital of France?")
    out = paged_greedy(ours.model, ours.config, ids, 16)
    eos = ours.tokenizer.eos_token_ids
    end = next((i for i, t in enumerate(out) if t in eos), len(out))
    text = ours.tokenizer.decode(out[:end])
    assert "Paris" in text, text

