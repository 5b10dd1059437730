"""The model variants the quantization benchmarks compare, loaded the way a worker loads them.

A variant is a weight dtype plus a quantization config; `load_variant` calls the worker's own
`load_model`, so what is measured is what `--quantization` serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from services.worker.model.loader import LoadedModel, load_model
from services.worker.quant.config import QuantConfig


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype
    quant: QuantConfig


def variants(group_size: int = 32, int4_head: str | None = None) -> dict[str, Variant]:
    """float32, bf16, int8 and int4 (group `group_size`; head as the worker's default)."""
    return {
        "float32": Variant("float32", torch.float32, QuantConfig()),
        "bf16": Variant("bf16", torch.bfloat16, QuantConfig()),
        "int8": Variant("int8", torch.float32, QuantConfig("int8")),
        "int4": Variant("int4", torch.float32,
                        QuantConfig("int4", group_size=group_size, head_scheme=int4_head)),
    }


def load_variant(v: Variant, path: Path, with_tokenizer: bool = False) -> LoadedModel:
    return load_model(path, dtype=v.dtype, quantization=v.quant, with_tokenizer=with_tokenizer)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once (tied and shared tensors)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():  # oneDNN-packed linears hold an opaque tensor as an attribute
        packed = getattr(m, "packed", None)
        if isinstance(packed, torch.Tensor) and packed.is_mkldnn:
            total += packed.numel() * packed.element_size()
    return total
