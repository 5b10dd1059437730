"""Quantized loading: every linear replaced, fused shards routed to their rows, the tied
embedding served from the head's matrix, and GGUF Q4_1 codes carried over exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from torch import nn

from services.worker.model.attention import AttentionMetadata, forward_context
from services.worker.model.loader import load_model
from services.worker.model.weights_hf import iter_hf_weights
from services.worker.quant.base import QuantizedEmbedding, QuantLinear
from services.worker.quant.config import QuantConfig
from services.worker.quant.gguf_blocks import GGUFBlocks
from services.worker.quant.int4 import Int4Linear
from services.worker.quant.int8 import Int8Linear
from services.worker.quant.loading import load_quantized


def _logits(loaded, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), forward_context(AttentionMetadata.for_prefill([len(ids)])):
        hidden = loaded.model(torch.tensor(ids), torch.arange(len(ids)))
        return loaded.model.compute_logits(hidden)


@pytest.fixture(scope="module")
def tiny_float(tiny_model_dir):
    return load_model(tiny_model_dir, with_tokenizer=False)


@pytest.mark.parametrize("cfg", [QuantConfig("int8"), QuantConfig("int8", int8_method="rtn"),
                                 QuantConfig("int4"), QuantConfig("int4", head_scheme="int4")],
                         ids=["int8-gptq", "int8-rtn", "int4", "int4-head-int4"])
def test_tiny_model_loads_quantized(tiny_model_dir, tiny_float, cfg):
    loaded = load_model(tiny_model_dir, quantization=cfg, with_tokenizer=False)
    model = loaded.model
    assert loaded.quantization == cfg
    assert not any(type(m) in (nn.Linear,) for m in model.modules())
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.model.embed_tokens.head is model.lm_head  # one matrix for both (tied)
    body = {type(m) for n, m in model.named_modules()
            if "layers" in n and isinstance(m, QuantLinear)}
    assert body == {Int8Linear if cfg.scheme == "int8" else Int4Linear}
    assert type(model.lm_head) is (Int4Linear if cfg.head == "int4" else Int8Linear)
    ids = list(range(5, 45))
    want, got = _logits(tiny_float, ids), _logits(loaded, ids)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.03 if cfg.scheme == "int8" else 0.2), rel  # random weights: int4 is coarse


def test_missing_shard_is_reported(tiny_model_dir):
    model = load_model(tiny_model_dir, with_tokenizer=False, pack_cpu_linears=False).model
    sources = [(n, t) for n, t in iter_hf_weights(tiny_model_dir)
               if "layers.1.self_attn.k_proj" not in n]
    with pytest.raises(KeyError, match="layers.1.self_attn.qkv_proj"):
        load_quantized(model, sources, QuantConfig("int8", int8_method="rtn"))


def test_q4_1_blocks_load_as_codes(smollm2_gguf_reader):
    """A Q4_1 tensor goes into Int4Linear (group 32) with no rounding: its dequantized weight is
    the file's, to float32 rounding."""
    t = next(t for t in smollm2_gguf_reader.tensors if t.name == "blk.0.attn_k.weight")
    assert t.tensor_type == GGMLQuantizationType.Q4_1
    src = GGUFBlocks(t.tensor_type, torch.from_numpy(np.array(t.data)), int(t.shape[0]))
    want = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)))
    assert torch.equal(src.dequantize(), want)
    lin = Int4Linear(want.shape[1], want.shape[0], group_size=32)
    lin.load_rows(0, src)
    lin.finalize()
    # The CPU form keeps bf16 scales (torch's kernel takes them with bf16 activations).
    assert ((lin.dequantize() - want).abs().max() / want.abs().max()).item() < 1e-2
    exact = Int4Linear(want.shape[1], want.shape[0], group_size=32)
    exact.load_rows(0, src)  # before finalize: the portable float32 format
    torch.testing.assert_close(exact.dequantize(), want, atol=1e-6, rtol=1e-6)


def test_q8_0_blocks_decode(smollm2_gguf_reader):
    t = next(t for t in smollm2_gguf_reader.tensors if t.name == "token_embd.weight")
    rows = np.array(t.data[:64])
    src = GGUFBlocks(t.tensor_type, torch.from_numpy(rows), int(t.shape[0]))
    assert torch.equal(src.dequantize(),
                       torch.from_numpy(np.array(dequantize(rows, t.tensor_type))))
