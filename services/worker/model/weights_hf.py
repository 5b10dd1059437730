"""Reading Hugging Face checkpoint folders: config.json plus one or many *.safetensors shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from .config import ModelConfig


def hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def safetensors_files(folder: Path) -> list[Path]:
    """The shards named by `model.safetensors.index.json`, else every *.safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    return files


def iter_hf_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) from every shard, memory-mapped, in the checkpoint's dtype."""
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
