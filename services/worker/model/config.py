"""The model's shape, read once from a Hugging Face `config.json` or from GGUF metadata.

`ModelConfig` is the only thing the model code reads; the two factories below are the only places
that know the two on-disk vocabularies (HF config keys and GGUF `{arch}.*` keys).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping


class UnsupportedModel(ValueError):
    """The checkpoint asks for something this engine does not implement; the message says what."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF `rope_scaling` / `rope_parameters`.

    rope_type: "default", "linear" or "llama3" (see `rope.py` for the registry).
    factor: context extension factor (linear, llama3).
    low_freq_factor / high_freq_factor / original_max_position_embeddings: llama3 only.
    """

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder; every field is validated in `__post_init__`."""

    architecture: str
    """Registry key, the HF class name (e.g. "LlamaForCausalLM", "Qwen2ForCausalLM")."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Key/value heads; fewer than `num_heads` means grouped-query attention."""
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    """Longest context the model supports (capped by a sliding window when one is set)."""
    tie_word_embeddings: bool
    """The LM head reuses the token embedding matrix."""
    qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2; Llama with attention_bias)."""
    o_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rotary_dim: int | None = None
    """Dimensions that are rotated (partial rotary); None means all of `head_dim`."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"rms_norm_eps must be a positive finite number, got {self.rms_norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta must be a positive finite number, got {self.rope_theta}")
        rot = self.rotary_dim if self.rotary_dim is not None else self.head_dim
        if rot % 2 or rot > self.head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim ({self.head_dim}), got {rot}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ------------------------------------------------------------------ factories

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from a parsed HF `config.json`."""
        archs = cfg.get("architectures") or []
        if len(archs) != 1:
            raise UnsupportedModel(f"config.json must name exactly one architecture, got {archs!r}")
        arch = archs[0]
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        # transformers 5 writes `rope_parameters`; older configs write rope_theta + rope_scaling.
        rope_params = dict(cfg.get("rope_parameters") or {})
        theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = _rope_scaling_from_hf(rope_params or cfg.get("rope_scaling"))
        # A sliding window only changes attention beyond the window, so capping the context at
        # the window keeps full attention exact instead of silently diverging.
        window = cfg.get("sliding_window")
        if window and cfg.get("use_sliding_window", arch != "Qwen2ForCausalLM"):
            max_pos = min(max_pos, int(window))
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = attention_bias or arch == "Qwen2ForCausalLM"  # Qwen2 always has q/k/v bias
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_scaling=scaling,
        )

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any], architecture: str,
                  tensor_names: set[str]) -> "ModelConfig":
        """Build from GGUF key/values (`{arch}.*`); `architecture` is the HF registry key."""
        arch = metadata["general.architecture"]

        def key(name: str, default: Any = None) -> Any:
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise UnsupportedModel(f"GGUF metadata lacks {arch}.{name}")
            return value

        hidden = int(key("embedding_length"))
        heads = int(key("attention.head_count"))
        vocab = metadata.get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(metadata["tokenizer.ggml.tokens"])
        head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden // heads)
        rot_dim = metadata.get(f"{arch}.rope.dimension_count")
        scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        scaling = RopeScaling()
        if scaling_type == "linear":
            scaling = RopeScaling("linear", float(key("rope.scaling.factor")))
        elif scaling_type not in ("none", None):
            raise UnsupportedModel(f"GGUF rope scaling type {scaling_type!r} is not supported")
        return cls(
            architecture=architecture,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(key("context_length")),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            rope_scaling=scaling,
            rotary_dim=int(rot_dim) if rot_dim and int(rot_dim) != head_dim else None,
        )


def _rope_scaling_from_hf(raw: Mapping[str, Any] | None) -> RopeScaling:
    if not raw:
        return RopeScaling()
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    return RopeScaling(
        rope_type=rope_type,
        factor=float(raw.get("factor", 1.0)),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )
