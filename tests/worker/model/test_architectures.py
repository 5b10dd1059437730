"""Tiny random HF checkpoints of each supported variant against transformers, in float32.

Covers GQA ratios (1, 2, 3, 8), tied and untied heads, q/k/v(/o) and MLP biases, explicit
head_dim, RoPE scaling types, sharded safetensors, and the GGUF q/k un-permutation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from services.worker.model.attention import AttentionMetadata, forward_context
from services.worker.model.config import ModelConfig, UnsupportedModel
from services.worker.model.loader import load_model
from services.worker.model.registry import model_class

from .paged import paged_greedy

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-6)

VARIANTS = {
    "llama-gqa2-untied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                              tie_word_embeddings=False)),
    "llama-mha-tied-bias": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                                tie_word_embeddings=True, attention_bias=True,
                                                mlp_bias=True)),
    "llama3-rope-headdim": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                              rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-qkv-bias-gqa3": ("Qwen2Config", dict(num_attention_heads=6, num_key_value_heads=2,
                                                hidden_size=96, tie_word_embeddings=True)),
    "mistral-mqa8": ("MistralConfig", dict(num_attention_heads=8, num_key_value_heads=1,
                                           sliding_window=None, tie_word_embeddings=False)),
}


def _make_checkpoint(tmp_path, variant: str, seed: int = 0, **save_kwargs):
    cls_name, extra = VARIANTS[variant]
    cfg = getattr(transformers, cls_name)(**{**BASE, **extra})
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    # Random init leaves biases at zero; make them matter.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path, **save_kwargs)
    return ref


def _logits(model, ids):
    with torch.no_grad(), forward_context(AttentionMetadata.for_prefill([len(ids)])):
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_transformers(tmp_path, variant):
    ref = _make_checkpoint(tmp_path, variant)
    ours = load_model(tmp_path, with_tokenizer=False)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (100,), generator=gen).tolist()
    got = _logits(ours.model, ids)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-5, rel
    # The paged path with a chunked prefill gives the same greedy tokens as HF's full forward.
    out = paged_greedy(ours.model, ours.config, ids[:40], 24, block_size=8, prefill_chunk=13)
    seq = list(ids[:40])
    with torch.no_grad():
        for _ in range(24):
            seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out == seq[40:]


def test_config_fields_per_variant(tmp_path):
    _make_checkpoint(tmp_path, "qwen2-qkv-bias-gqa3")
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert (cfg.qkv_bias, cfg.o_bias, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        True, False, 6, 2, 16)


def test_sharded_checkpoint(tmp_path):
    ref = _make_checkpoint(tmp_path, "llama-gqa2-untied", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = load_model(tmp_path, with_tokenizer=False)
    ids = list(range(1, 30))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert torch.allclose(_logits(ours.model, ids), want, atol=1e-5, rtol=1e-5)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": ["GPT2LMHeadModel"],
                                                      "num_attention_heads": 4}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel"):
        load_model(tmp_path, with_tokenizer=False)
    with pytest.raises(UnsupportedModel, match="supported"):
        model_class("FalconForCausalLM")


def test_missing_tensor_is_reported(tmp_path):
    ref = _make_checkpoint(tmp_path, "llama-gqa2-untied")
    ours = load_model(tmp_path, with_tokenizer=False, pack_cpu_linears=False)
    state = {k: v for k, v in ref.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(KeyError, match="up_proj"):
        ours.model.load_weights(state.items())


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF->GGUF q/k permutation (half-split -> interleaved pairs), for the test only."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_llama_roundtrip(tmp_path):
    """A tiny Llama written as GGUF the way llama.cpp's converter does (q/k permuted, F32 + F16)."""
    gguf = pytest.importorskip("gguf")
    ref = _make_checkpoint(tmp_path / "hf", "llama-gqa2-untied")
    c = ref.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    for name, t in ref.state_dict().items():
        arr = t.numpy().copy()
        if name in names:
            gname = names[name]
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{layer}.{block[rest]}.weight"
        if gname.endswith("attn_q.weight"):
            arr = _permute(arr, c.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            arr = _permute(arr, c.num_key_value_heads)
        # 2-D matrices as F16 exercise a second tensor type; norms stay F32.
        if arr.ndim == 2 and "token_embd" not in gname:
            arr = arr.astype(np.float16)
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    with torch.no_grad():  # reference with the same F16 rounding of the matrices
        for name, p in ref.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.copy_(p.half().float())
    ours = load_model(path, with_tokenizer=False)
    ids = list(range(3, 60))
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = _logits(ours.model, ids)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
