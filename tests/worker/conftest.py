"""Shared fixtures for worker tests: the real SmolLM2 GGUF, opened once per session."""

from __future__ import annotations

import gguf
import pytest

from services.common.assets import smollm2_gguf_path
from services.worker.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def smollm2_gguf_reader() -> gguf.GGUFReader:
    """One `GGUFReader` for the whole session: opening it parses the 49k vocab (~2.5 s)."""
    return gguf.GGUFReader(smollm2_gguf_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_reader: gguf.GGUFReader) -> Tokenizer:
    """SmolLM2's tokenizer built from the GGUF metadata."""
    return Tokenizer.from_gguf(smollm2_gguf_reader)
