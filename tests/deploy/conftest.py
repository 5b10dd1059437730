"""Fixtures of the deploy tests: tiny random worker models, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.router.conftest import build_tiny_model
from tests.worker.conftest import smollm2_gguf_reader, smollm2_tokenizer  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:  # noqa: F811
    """Two tiny random Llamas with SmolLM2's tokenizer (HF folders): "small" and "large"."""
    return {name: build_tiny_model(tmp_path_factory.mktemp(f"tiny-{name}"), smollm2_tokenizer,
                                   seed) for seed, name in enumerate(("small", "large"))}
