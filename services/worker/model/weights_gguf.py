"""Reading GGUF checkpoints: metadata, and tensors renamed to HF names and dequantized to torch.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized with the `gguf` package. Arrays come out in
torch's [out, in] order. Llama q/k rows are un-permuted here (see `registry.GGUFArch`).
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from .config import ModelConfig
from .registry import GGUFArch

# Big arrays only the tokenizer needs; skipped when building the metadata dict.
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.scores")

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """Key/value metadata as Python values, without the tokenizer's large arrays."""
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in _TOKENIZER_ARRAYS}
    if "tokenizer.ggml.tokens" in reader.fields:
        meta["tokenizer.ggml.num_tokens"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return meta


def gguf_config(reader: GGUFReader, arch: GGUFArch) -> ModelConfig:
    meta = gguf_metadata(reader)
    if f"{meta['general.architecture']}.vocab_size" not in meta:
        meta["tokenizer.ggml.tokens"] = range(meta.get("tokenizer.ggml.num_tokens", 0))
    names = {t.name for t in reader.tensors}
    return ModelConfig.from_gguf(meta, arch.hf_architecture, names)


def hf_name(gguf_name: str) -> str:
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if not m or m.group(2) not in _BLOCK:
        raise KeyError(f"GGUF tensor {gguf_name!r} has no known mapping")
    return f"model.layers.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> HF half-split), per head.

    w: [n_head * head_dim, in] (or a bias [n_head * head_dim]).
    """
    out = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).transpose(1, 2).reshape(out, *rest)


def _to_torch(tensor: Any) -> torch.Tensor:
    # F32/F16 pass through `dequantize` unchanged; block formats (Q4_1, Q8_0, ...) expand.
    arr = dequantize(tensor.data, tensor.tensor_type)
    # The reader's arrays are read-only memmaps; torch needs a writable, owned buffer.
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))


def iter_gguf_weights(reader: GGUFReader, cfg: ModelConfig,
                      arch: GGUFArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF name, float32 tensor) for every tensor in the file."""
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        w = _to_torch(tensor)
        if arch.permuted_qk and ".q_proj." in name:
            w = unpermute_qk(w, cfg.num_heads)
        elif arch.permuted_qk and ".k_proj." in name:
            w = unpermute_qk(w, cfg.num_kv_heads)
        yield name, w
