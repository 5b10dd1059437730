"""One entry point for every checkpoint kind: `load_model(path)` -> model, config, tokenizer.

A source registry keyed by what the path is (a `.gguf` file, or a folder with `config.json`)
picks the reader; each source yields HF-named tensors that the model's `load_weights` consumes.
With `quantization`, linears are replaced by quantized ones and filled from the source directly
(services/worker/quant/loading.py); GGUF sources then yield block-quantized tensors undecoded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..quant.config import QuantConfig

import torch
from torch import nn

from .config import ModelConfig, UnsupportedModel
from .cpu_linear import pack_linears, packing_supported
from .registry import gguf_architecture, model_class

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to run, with what a server needs to describe it."""

    model: nn.Module
    config: ModelConfig
    tokenizer: "Tokenizer"
    model_id: str
    """Human-readable name (GGUF general.name, or the checkpoint folder's name)."""
    model_version: str
    """Content fingerprint of the checkpoint (16 hex chars); changes when the weights change."""
    load_seconds: float
    quantization: QuantConfig = QuantConfig()
    """Weight-only quantization the linears were loaded with (scheme "none" = float)."""


@dataclass(frozen=True)
class _Parts:
    config: ModelConfig
    weights: Callable[[], object]  # -> Iterable[(hf_name, tensor)]
    quant_sources: Callable[[], object]  # -> Iterable[(hf_name, tensor | GGUFBlocks)]
    tokenizer: Callable[[], "Tokenizer"]
    model_id: str
    model_version: str


def _fingerprint(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()[:16]


def _edges(path: Path, n: int = 1 << 20) -> bytes:
    """Size + first and last MiB of a file: changes with any re-quantization or re-export."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(n)
        f.seek(max(0, size - n))
        tail = f.read(n)
    return size.to_bytes(8, "little") + head + tail


def _gguf_parts(path: Path) -> _Parts:
    from gguf import GGUFReader

    from ..tokenizer import Tokenizer
    from ..quant.gguf_blocks import iter_gguf_sources
    from .weights_gguf import gguf_config, iter_gguf_weights

    reader = GGUFReader(str(path))
    arch = gguf_architecture(reader.fields["general.architecture"].contents())
    cfg = gguf_config(reader, arch)
    name_field = reader.fields.get("general.name")
    model_id = name_field.contents() if name_field is not None else path.stem
    return _Parts(cfg, lambda: iter_gguf_weights(reader, cfg, arch),
                  lambda: iter_gguf_sources(reader, cfg, arch),
                  lambda: Tokenizer.from_gguf(reader), model_id, _fingerprint(_edges(path)))


def _hf_parts(folder: Path) -> _Parts:
    from ..tokenizer import Tokenizer
    from .weights_hf import hf_config, iter_hf_weights, safetensors_files

    cfg = hf_config(folder)
    chunks = [(folder / "config.json").read_bytes()]
    chunks += [_edges(f, 1 << 16) for f in safetensors_files(folder)]
    return _Parts(cfg, lambda: iter_hf_weights(folder), lambda: iter_hf_weights(folder),
                  lambda: Tokenizer.from_hf_dir(folder), folder.name, _fingerprint(*chunks))


def _source(path: Path) -> Callable[[Path], _Parts]:
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_parts
    if path.is_dir() and (path / "config.json").is_file():
        return _hf_parts
    raise UnsupportedModel(
        f"{path} is neither a .gguf file nor a folder with config.json + *.safetensors"
    )


def build_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> nn.Module:
    """An uninitialised model of the registered class for `cfg.architecture`."""
    cls = model_class(cfg.architecture)
    # Random init of 100M+ params is wasted work before load_weights overwrites them.
    with torch.device(device), _skip_init():
        model = cls(cfg)
    return model.to(dtype=dtype).eval()


class _skip_init:
    """Turns nn.Linear / nn.Embedding init into no-ops while models are built."""

    def __enter__(self) -> None:
        self._saved = (nn.Linear.reset_parameters, nn.Embedding.reset_parameters)
        nn.Linear.reset_parameters = lambda self: None  # type: ignore[method-assign]
        nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = self._saved


def load_model(path: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", with_tokenizer: bool = True,
               pack_cpu_linears: bool = True,
               quantization: QuantConfig | str | None = None) -> LoadedModel:
    """Loads a GGUF file or an HF checkpoint folder; the rotary tables stay in float32.

    pack_cpu_linears: on CPU in float32, swap nn.Linear for oneDNN-prepacked layers (~2x faster
    matmuls here; see cpu_linear.py). Off for code that needs the nn.Linear weights.
    quantization: a QuantConfig or scheme name ("none", "int8", "int4"); weight-only, applied
    while loading (see services/worker/quant/).
    """
    start = time.perf_counter()
    path = Path(path)
    quant = QuantConfig.of(quantization)
    parts = _source(path)(path)
    model = build_model(parts.config, dtype, device)
    tokenizer = parts.tokenizer() if with_tokenizer or quant.calibrated else None
    if quant.calibrated:  # GPTQ: the float model runs calibration text, then is replaced
        from ..quant.gptq import calibration_ids, collect_hessians
        from ..quant.schemes import quantize_model

        model.load_weights(parts.weights())
        quantize_model(model, quant, collect_hessians(model, calibration_ids(tokenizer)))
    elif quant.enabled:
        from ..quant.loading import load_quantized

        load_quantized(model, parts.quant_sources(), quant)
    else:
        model.load_weights(parts.weights())
    if pack_cpu_linears and packing_supported(torch.device(device), dtype):
        pack_linears(model)
    tokenizer = tokenizer if with_tokenizer else None
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %s, quantization %s) in %.2f s", parts.model_id,
                parts.config.architecture, dtype, quant.scheme, seconds)
    return LoadedModel(model, parts.config, tokenizer, parts.model_id, parts.model_version,
                       seconds, quant)
