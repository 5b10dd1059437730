"""GGUF tensors as the quantized linears' row sources: Q4_1 / Q8_0 blocks decoded to integer codes
and their scales without materializing float weights; other types dequantized to float.

Q4_1 block (32 weights, 20 bytes): fp16 d, fp16 m, 16 bytes of nibbles (byte j: weight j in the
low nibble, weight j + 16 in the high one); w = d * q + m. Q8_0 block (32 weights, 34 bytes):
fp16 d, 32 int8; w = d * q. Tensors arrive as uint8 rows [out, bytes_per_row] (torch order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from services.worker.model.config import ModelConfig
from services.worker.model.registry import GGUFArch
from services.worker.model.weights_gguf import hf_name, unpermute_qk

BLOCK = 32
_BLOCK_BYTES = {GGMLQuantizationType.Q4_1: 20, GGMLQuantizationType.Q8_0: 34}


@dataclass
class GGUFBlocks:
    """Rows of a Q4_1 or Q8_0 tensor. data: uint8 [N, (K / 32) * block_bytes]."""

    qtype: GGMLQuantizationType
    data: torch.Tensor
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    def _blocks(self) -> torch.Tensor:
        n = self.data.shape[0]
        return self.data.view(n, self.in_features // BLOCK, _BLOCK_BYTES[self.qtype])

    def q4_1(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes uint8 [N, K] (0..15); d, m float32 [N, K/32]: w = d * code + m."""
        assert self.qtype == GGMLQuantizationType.Q4_1
        b = self._blocks()
        d = b[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
        m = b[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
        qs = b[..., 4:]  # [N, K/32, 16]
        codes = torch.cat((qs & 0xF, qs >> 4), dim=-1)  # weights 0..15, then 16..31
        return codes.reshape(b.shape[0], -1), d, m

    def q8_0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q int8 [N, K]; d float32 [N, K/32]: w = d * q."""
        assert self.qtype == GGMLQuantizationType.Q8_0
        b = self._blocks()
        d = b[..., 0:2].contiguous().view(torch.float16)[..., 0].float()
        q = b[..., 2:].contiguous().view(torch.int8)
        return q.reshape(b.shape[0], -1), d

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] (for schemes whose layout differs from the file's)."""
        if self.qtype == GGMLQuantizationType.Q4_1:
            codes, d, m = self.q4_1()
            w = codes.view(codes.shape[0], -1, BLOCK).float() * d[..., None] + m[..., None]
        else:
            q, d = self.q8_0()
            w = q.view(q.shape[0], -1, BLOCK).float() * d[..., None]
        return w.reshape(self.shape)


RowSource = "torch.Tensor | GGUFBlocks"


def _float(tensor) -> torch.Tensor:
    arr = dequantize(tensor.data, tensor.tensor_type)
    # The reader's arrays are read-only memmaps; torch needs a writable, owned buffer.
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))


def iter_gguf_sources(reader: GGUFReader, cfg: ModelConfig,
                      arch: GGUFArch) -> Iterator[tuple[str, "torch.Tensor | GGUFBlocks"]]:
    """Yields (HF name, source): GGUFBlocks for Q4_1/Q8_0 matrices, float32 tensors otherwise.
    Llama q/k rows are un-permuted either way (the permutation moves whole rows)."""
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if tensor.tensor_type in _BLOCK_BYTES and len(tensor.shape) == 2:
            raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True))
            src: torch.Tensor | GGUFBlocks = GGUFBlocks(tensor.tensor_type, raw,
                                                         int(tensor.shape[0]))
        else:
            src = _float(tensor)
        if arch.permuted_qk and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            if isinstance(src, GGUFBlocks):
                src = GGUFBlocks(src.qtype, unpermute_qk(src.data, heads), src.in_features)
            else:
                src = unpermute_qk(src, heads)
        yield name, src
