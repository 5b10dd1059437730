"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2, loaded offline.

The model is loaded with `sentence-transformers` (which checks the pipeline: BERT encoder, mean
pooling, L2 normalization). Queries are then embedded by a compact forward pass over the same
weights (`_FastMiniLM`), because `SentenceTransformer.encode` costs ~17 ms per single query on a
contended 2-core CPU, against ~8 ms here with bf16 matmuls: the semantic lookup budget is 20 ms.
At load the fast path is checked against `encode` on probe sentences; it refuses to start if
they disagree (cosine < 0.999). Measured: bf16 moves pairwise similarities by at most 6e-4.

`HF_HUB_OFFLINE=1` must be set before `sentence_transformers` is imported; `load_minilm` sets it
(setdefault) right before the import, since loading never needs the network.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

EMBED_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_WARM_UP_TOKENS = 64  # queries (last user turns) are rarely longer
_PROBES = (
    "What is the capital of France?",
    "Is aspirin not safe for children?",
    "how do i cancel my subscription",
)


class Embedder(Protocol):
    """Maps texts to L2-normalized float32 vectors."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds texts. Returns float32 [len(texts), dim], each row of unit norm."""
        ...


class _FastMiniLM:
    """BERT encoder + mean pooling + normalize over a SentenceTransformer's weights.

    Linear weights are held in `dtype`; embeddings, layer norms and residuals stay in float32.
    """

    def __init__(self, bert: torch.nn.Module, tokenizer_json: Path, dtype: torch.dtype,
                 max_seq_len: int):
        from tokenizers import Tokenizer

        cfg = bert.config
        sd = {k: v.detach().float().clone() for k, v in bert.state_dict().items()}
        self.num_heads = cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.eps = cfg.layer_norm_eps
        self.dtype = dtype
        self.word = sd["embeddings.word_embeddings.weight"]
        self.pos = sd["embeddings.position_embeddings.weight"]
        self.type0 = sd["embeddings.token_type_embeddings.weight"][0]
        self.emb_ln = (sd["embeddings.LayerNorm.weight"], sd["embeddings.LayerNorm.bias"])
        self.layers = [self._layer(sd, f"encoder.layer.{i}.") for i in range(cfg.num_hidden_layers)]
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.no_padding()  # tokenizer.json pads to 128; we pad per batch instead
        self.tokenizer.enable_truncation(max_seq_len)

    def _layer(self, sd: dict[str, torch.Tensor], p: str) -> dict[str, torch.Tensor]:
        att = p + "attention.self."
        # One fused QKV matmul instead of three: fewer, larger GEMMs at batch 1.
        qkv_w = torch.cat([sd[att + n + ".weight"] for n in ("query", "key", "value")])
        qkv_b = torch.cat([sd[att + n + ".bias"] for n in ("query", "key", "value")])
        d = self.dtype
        return {
            "qkv_w": qkv_w.to(d), "qkv_b": qkv_b.to(d),
            "o_w": sd[p + "attention.output.dense.weight"].to(d),
            "o_b": sd[p + "attention.output.dense.bias"].to(d),
            "ln1_w": sd[p + "attention.output.LayerNorm.weight"],
            "ln1_b": sd[p + "attention.output.LayerNorm.bias"],
            "i_w": sd[p + "intermediate.dense.weight"].to(d),
            "i_b": sd[p + "intermediate.dense.bias"].to(d),
            "f_w": sd[p + "output.dense.weight"].to(d),
            "f_b": sd[p + "output.dense.bias"].to(d),
            "ln2_w": sd[p + "output.LayerNorm.weight"],
            "ln2_b": sd[p + "output.LayerNorm.bias"],
        }

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        encs = self.tokenizer.encode_batch(list(texts))
        b, n = len(encs), max(len(e.ids) for e in encs)
        ids = torch.zeros(b, n, dtype=torch.long)
        mask = torch.zeros(b, n, dtype=torch.bool)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            mask[i, : len(e.ids)] = True
        return self.forward(ids, mask)

    def warm_up(self, max_len: int) -> None:
        """Runs one query of every length up to max_len tokens: the first matmul of each new
        shape costs 3-6 ms more (oneDNN builds a kernel for it), which would otherwise land on
        the first live queries of each length."""
        for n in range(1, max_len + 1):
            self.forward(torch.full((1, n), 1000), torch.ones(1, n, dtype=torch.bool))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """Token ids and attention mask [b, n] -> unit embeddings [b, hidden] (float32)."""
        b, n = ids.shape
        # x: [b, n, hidden]
        x = self.word[ids] + self.pos[:n] + self.type0
        x = F.layer_norm(x, (self.hidden,), *self.emb_ln, self.eps)
        # attn_mask: [b, 1, 1, n], True = attend; None for one sequence (no padding).
        attn_mask = mask[:, None, None, :] if b > 1 else None
        for layer in self.layers:
            x = self._block(x, layer, attn_mask)
        m = mask.unsqueeze(-1).float()
        pooled = (x * m).sum(1) / m.sum(1)
        return F.normalize(pooled, dim=-1).numpy().astype(np.float32, copy=False)

    def _block(self, x: torch.Tensor, w: dict[str, torch.Tensor],
               attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        # qkv: [3, b, heads, n, head_dim]
        qkv = F.linear(x.to(self.dtype), w["qkv_w"], w["qkv_b"])
        qkv = qkv.view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        a = a.transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(a, w["o_w"], w["o_b"]).float()
        x = F.layer_norm(x, (d,), w["ln1_w"], w["ln1_b"], self.eps)
        f = F.gelu(F.linear(x.to(self.dtype), w["i_w"], w["i_b"]))
        x = x + F.linear(f, w["f_w"], w["f_b"]).float()
        return F.layer_norm(x, (d,), w["ln2_w"], w["ln2_b"], self.eps)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 embeddings (dim 384), with a small LRU of recent texts.

    The LRU lets Store reuse the vector computed by the Lookup that preceded it. Thread-safe.
    """

    def __init__(self, fast: _FastMiniLM, dim: int, lru_size: int = 1024):
        self._fast = fast
        self.dim = dim
        self._lru: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lru_size = lru_size
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds texts. Returns float32 [len(texts), 384], unit rows."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: list[int] = []
        with self._lock:
            for i, t in enumerate(texts):
                v = self._lru.get(t)
                if v is None:
                    todo.append(i)
                else:
                    self._lru.move_to_end(t)
                    out[i] = v
        if todo:
            out[todo] = self._fast([texts[i] for i in todo])
            if not self._lru_size:
                return out
            with self._lock:
                for i in todo:
                    self._lru[texts[i]] = out[i].copy()
                while len(self._lru) > self._lru_size:
                    self._lru.popitem(last=False)
        return out


def load_minilm(model_dir: Path, dtype: str = "bfloat16", lru_size: int = 1024) -> MiniLMEmbedder:
    """Loads all-MiniLM-L6-v2 from `model_dir` offline and checks the fast path against it.

    Raises ValueError if the pipeline is not BERT + mean pooling + normalize, or if the fast
    path disagrees with `SentenceTransformer.encode`.
    """
    if dtype not in EMBED_DTYPES:
        raise ValueError(f"embed dtype must be one of {sorted(EMBED_DTYPES)}, got {dtype!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu")
    kinds = [type(m).__name__ for m in st]
    pooling = st[1].get_config_dict().get("pooling_mode") if len(kinds) > 1 else None
    if kinds != ["Transformer", "Pooling", "Normalize"] or pooling != "mean":
        raise ValueError(f"{model_dir}: expected Transformer+Pooling(mean)+Normalize, got {kinds}")
    fast = _FastMiniLM(st[0].auto_model, model_dir / "tokenizer.json", EMBED_DTYPES[dtype],
                       st.max_seq_length)
    ref = st.encode(list(_PROBES), normalize_embeddings=True, convert_to_numpy=True)
    got = fast(list(_PROBES))
    agreement = float((ref * got).sum(axis=1).min())
    if agreement < 0.999:
        raise ValueError(f"fast MiniLM path disagrees with sentence-transformers: cos {agreement}")
    fast.warm_up(_WARM_UP_TOKENS)
    logger.info("loaded MiniLM from %s (dtype %s, agreement %.6f)", model_dir, dtype, agreement)
    return MiniLMEmbedder(fast, dim=ref.shape[1], lru_size=lru_size)
