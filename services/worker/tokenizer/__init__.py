"""Tokenizer layer of the worker: GGUF/HF tokenizers, chat templates, streaming detokenization."""

from services.worker.tokenizer.chat_template import ChatTemplateError
from services.worker.tokenizer.detokenizer import IncrementalDetokenizer
from services.worker.tokenizer.gguf_vocab import (
    PRE_TOKENIZERS,
    GGUFTokenizerMetadata,
    UnsupportedTokenizerError,
)
from services.worker.tokenizer.tokenizer import Tokenizer

__all__ = [
    "PRE_TOKENIZERS",
    "ChatTemplateError",
    "GGUFTokenizerMetadata",
    "IncrementalDetokenizer",
    "Tokenizer",
    "UnsupportedTokenizerError",
]
