"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (q/k/v bias), SmolLM.

Parameter names follow the HF checkpoints except that q/k/v and gate/up are fused into one
matmul each (`qkv_proj`, `gate_up_proj`); `load_weights` packs HF-named tensors into them.
The model sees only (input_ids, positions); attention layout comes from the forward context.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .layers import RMSNorm, SiluAndMul
from .registry import register_architecture
from .rope import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.rotary = rotary
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer_idx)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) * D]
        q, k = self.rotary.rotate_qk(rope, qkv, self.num_heads, self.num_kv_heads)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v)  # [T, Hq, D]
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, rotary)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = rotary = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions)  # shared by all layers
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        x, _ = self.norm(x, residual)
        return x


# HF name -> (our fused parameter, shard index): shard i of [q, k, v] or [gate, up].
_PACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_PACKED_RE = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")
# Buffers some checkpoints carry that we recompute.
_IGNORED_RE = re.compile(r"rotary_emb\.inv_freq$")


@register_architecture("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head; `forward` returns final hidden states, `compute_logits` the logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in float32."""
        return self.lm_head(hidden).float()

    def _shard_sizes(self, fused: str) -> list[int]:
        c = self.config
        if fused == "qkv_proj":
            return [c.q_size, c.kv_size, c.kv_size]
        return [c.intermediate_size, c.intermediate_size]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors into the parameters; raises on missing, unknown or misshapen ones."""
        params = dict(self.named_parameters())
        # Fused params count once per shard; a tied head is satisfied by the embedding.
        expected: set[str] = set()
        for name in params:
            fused = next((f for f in ("qkv_proj", "gate_up_proj") if f".{f}." in name), None)
            if fused is None:
                expected.add(name)
            else:
                hf = [k for k, (f, _) in _PACKED.items() if f == fused]
                expected.update(name.replace(fused, h) for h in hf)
        if self.config.tie_word_embeddings:
            expected.discard("lm_head.weight")
        seen: set[str] = set()
        for name, tensor in weights:
            if _IGNORED_RE.search(name):
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding already holds it
            m = _PACKED_RE.search(name)
            if m:
                fused, shard = _PACKED[m.group(1)]
                target = name[: m.start()] + f".{fused}.{m.group(2)}"
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no parameter {target!r}")
                sizes = self._shard_sizes(fused)
                dst = params[target].narrow(0, sum(sizes[:shard]), sizes[shard])
            else:
                if name not in params:
                    raise KeyError(f"checkpoint tensor {name!r} matches no model parameter")
                dst = params[name]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            seen.add(name)
        missing = expected - seen
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
