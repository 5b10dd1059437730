"""Quantization schemes by name, and module replacement on an already-built float model.

A scheme is a factory for empty quantized linears ("shells") of a given shape; `load_quantized`
(loading.py) fills shells from a checkpoint, `quantize_model` fills them from a float model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import QuantizedEmbedding, QuantLinear
from .config import QuantConfig
from .gptq import gptq_int8
from .int4 import Int4Linear
from .int8 import Int8Linear

ShellFactory = Callable[[int, int, bool, QuantConfig, torch.device], QuantLinear]
SCHEMES: dict[str, ShellFactory] = {}


def register_scheme(name: str) -> Callable[[ShellFactory], ShellFactory]:
    def wrap(factory: ShellFactory) -> ShellFactory:
        SCHEMES[name] = factory
        return factory
    return wrap


@register_scheme("int8")
def _int8(in_f: int, out_f: int, bias: bool, cfg: QuantConfig, device) -> QuantLinear:
    return Int8Linear(in_f, out_f, bias, device)


@register_scheme("int4")
def _int4(in_f: int, out_f: int, bias: bool, cfg: QuantConfig, device) -> QuantLinear:
    return Int4Linear(in_f, out_f, bias, cfg.group_size, device)


def make_shell(scheme: str, linear: nn.Linear, cfg: QuantConfig) -> QuantLinear:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; registered: {sorted(SCHEMES)}")
    return SCHEMES[scheme](linear.in_features, linear.out_features, linear.bias is not None, cfg,
                           linear.weight.device)


def _is_head(path: str) -> bool:
    return path == "lm_head" or path.endswith(".lm_head")


def install_shells(model: nn.Module, cfg: QuantConfig) -> dict[str, QuantLinear]:
    """Swaps every nn.Linear for an empty shell of its scheme (the head's may differ) and, when
    the head is tied to the token embedding and quantized, the embedding for a lookup into the
    head's shell. Returns {module path: shell}; the tied embedding's path maps to the head's."""
    shells: dict[str, QuantLinear] = {}
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            if type(child) is not nn.Linear:
                continue
            scheme = cfg.head if _is_head(full) else cfg.scheme
            if scheme == "none":
                continue
            shells[full] = shell = make_shell(scheme, child, cfg)
            setattr(module, name, shell)
    head = shells.get("lm_head")
    config = getattr(model, "config", None)
    if head is not None and getattr(config, "tie_word_embeddings", False):
        embed = model.get_submodule("model.embed_tokens")
        model.model.embed_tokens = QuantizedEmbedding(head, embed.weight.dtype)
        shells["model.embed_tokens"] = head
    return shells


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: QuantConfig,
                   hessians: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replaces the float linears of a loaded model by quantized ones (from their weights).

    hessians: per linear path, the calibration Gram matrix (gptq.collect_hessians); int8
    layers with one are rounded by GPTQ, everything else to nearest.
    """
    if not cfg.enabled:
        return model
    floats = {p: m.weight.detach() for p, m in model.named_modules() if type(m) is nn.Linear}
    biases = {p: m.bias.detach() for p, m in model.named_modules()
              if type(m) is nn.Linear and m.bias is not None}
    shells = install_shells(model, cfg)
    gptq: dict[tuple[int, int], list[str]] = {}  # same-shape layers run GPTQ together
    for path, shell in shells.items():
        if path not in floats:  # the tied embedding's alias shares the head's shell
            continue
        if hessians is not None and path in hessians and isinstance(shell, Int8Linear):
            gptq.setdefault(tuple(floats[path].shape), []).append(path)
        else:
            shell.load_rows(0, floats[path])
        if path in biases:
            shell.load_bias(0, biases[path])
    for paths in gptq.values():
        q, scale = gptq_int8(torch.stack([floats[p] for p in paths]),
                             torch.stack([hessians[p] for p in paths]))
        for i, p in enumerate(paths):
            shells[p].load_codes(0, q[i], scale[i])
    for shell in {id(s): s for s in shells.values()}.values():  # the tied head is listed twice
        shell.finalize()
    return model
