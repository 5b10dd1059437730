"""Loading a checkpoint straight into quantized linears: checkpoint tensors are routed to the
rows of their (possibly fused) target shell, so block-quantized GGUF tensors reach the int4
format as codes, and no full float copy of the model exists at any point."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from services.worker.model.llama import _PACKED  # HF projection name -> (fused module, shard)

from .base import QuantLinear
from .config import QuantConfig
from .gguf_blocks import GGUFBlocks
from .schemes import install_shells

logger = logging.getLogger(__name__)


def _target(model: nn.Module, shells: dict[str, QuantLinear],
            module_path: str) -> tuple[QuantLinear, int] | None:
    """The shell holding a checkpoint module's rows and the first row, or None (not quantized)."""
    if module_path in shells:
        return shells[module_path], 0
    parent, _, leaf = module_path.rpartition(".")
    if leaf in _PACKED:
        fused, shard = _PACKED[leaf]
        shell = shells.get(f"{parent}.{fused}")
        if shell is not None:
            return shell, sum(model._shard_sizes(fused)[:shard])
    return None


@torch.no_grad()
def load_quantized(model: nn.Module, sources: Iterable[tuple[str, object]],
                   cfg: QuantConfig) -> dict[str, QuantLinear]:
    """Installs quantized shells in `model` and fills them from `sources`: (HF name, float
    tensor or GGUFBlocks). Everything else goes through the model's own `load_weights`.
    Raises KeyError when a quantized layer's rows are not all provided."""
    shells = install_shells(model, cfg)
    tied = getattr(model.config, "tie_word_embeddings", False)
    filled = {id(s): 0 for s in shells.values()}
    rest: list[tuple[str, torch.Tensor]] = []
    for name, src in sources:
        module_path, _, kind = name.rpartition(".")
        if tied and module_path == "lm_head":
            continue  # the embedding holds the tied matrix
        hit = _target(model, shells, module_path)
        if hit is None:
            rest.append((name, src.dequantize() if isinstance(src, GGUFBlocks) else src))
        elif kind == "bias":
            hit[0].load_bias(hit[1], src)
        else:
            hit[0].load_rows(hit[1], src)
            filled[id(hit[0])] += src.shape[0]
    model.load_weights(rest)
    for path, shell in shells.items():
        if filled[id(shell)] != shell.out_features:
            raise KeyError(f"checkpoint filled {filled[id(shell)]} of {shell.out_features} rows "
                           f"of quantized layer {path!r}")
    for shell in {id(s): s for s in shells.values()}.values():  # the tied head is listed twice
        shell.finalize()
    logger.info("quantized %d linear layers (%s)", len({id(s) for s in shells.values()}),
                cfg.describe())
    return shells
