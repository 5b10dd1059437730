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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: Tokenizer):
    """A tiny random Llama (2 layers, GQA 4:2) with SmolLM2's tokenizer, saved as an HF folder.

    Fast enough for engine and gRPC tests that need many steps; random weights give near-flat
    logits, which makes batch-invariance checks harder, not easier.
    """
    import json

    import torch
    import transformers

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(
        vocab_size=smollm2_tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    smollm2_tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": smollm2_tokenizer.chat_template,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return folder
