"""Architectures by name: the HF class name in `config.json`, and GGUF's `general.architecture`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .config import UnsupportedModel

_MODELS: dict[str, type[nn.Module]] = {}


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF `general.architecture` maps onto our models.

    hf_architecture: registry key of the model class.
    permuted_qk: llama.cpp's converter permuted q/k rows for interleaved-pair RoPE ("normal" rope
        type); those rows must be un-permuted for our half-split RoPE. NEOX-rope models (Qwen2)
        are stored unpermuted.
    """

    hf_architecture: str
    permuted_qk: bool


GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", permuted_qk=True),
    "mistral": GGUFArch("MistralForCausalLM", permuted_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", permuted_qk=False),
}


def register_architecture(*names: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        for name in names:
            _MODELS[name] = cls
        return cls
    return wrap


def _ensure_loaded() -> None:
    # Model modules register themselves on import; import them here, not at package import.
    from . import llama  # noqa: F401


def model_class(architecture: str) -> type[nn.Module]:
    _ensure_loaded()
    if architecture not in _MODELS:
        raise UnsupportedModel(
            f"architecture {architecture!r} is not supported; supported: {sorted(_MODELS)}"
        )
    return _MODELS[architecture]


def gguf_architecture(name: str) -> GGUFArch:
    if name not in GGUF_ARCHITECTURES:
        raise UnsupportedModel(
            f"GGUF architecture {name!r} is not supported; supported: {sorted(GGUF_ARCHITECTURES)}"
        )
    return GGUF_ARCHITECTURES[name]
