"""Streaming detokenization: turn generated token ids into text deltas, one token at a time.

Design (bytes-based, not window re-decoding). In byte-level BPE every token stands for a fixed
byte string (`Tokenizer.token_bytes`), and `Tokenizer.decode(ids)` is exactly "concatenate the
tokens' bytes, then decode UTF-8, replacing invalid sequences with U+FFFD". So the detokenizer
feeds each token's bytes to Python's incremental UTF-8 decoder (errors="replace"):

- a character split across tokens (emoji, CJK: 3-4 bytes, often 2-4 tokens) stays buffered in
  the decoder until its last byte arrives, so a delta never holds half a character;
- bytes that can never become valid UTF-8 come out as U+FFFD as soon as that is certain, the
  same replacement `decode` makes (both follow Unicode's "maximal subpart" rule), so a model
  that emits garbage bytes streams the same text the full decode gives;
- each push costs O(bytes of that token), independent of how many tokens came before (vLLM's
  prefix_offset/read_offset scheme re-decodes a window of ids on every step instead).

Hence "".join(deltas) + flush() == tokenizer.decode(all_ids, skip_special_tokens) exactly.
Byte-level BPE has no whitespace clean-up step (`clean_up_tokenization_spaces`) and no
SentencePiece leading-space rule, so no earlier context (e.g. prompt ids) is needed either.
"""

from __future__ import annotations

import codecs
import logging

from services.worker.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class IncrementalDetokenizer:
    """Per-request streaming detokenizer. Not thread-safe; one per sequence."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        """`skip_special_tokens` drops special (control) tokens such as "<|im_end|>" from the
        text, as `tokenizer.decode(..., skip_special_tokens=True)` does."""
        self._tokenizer = tokenizer
        self._skip_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []
        self._finished = False

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is
        still incomplete or the token is a skipped special token)."""
        if self._finished:
            raise RuntimeError("push() after flush(): this detokenizer is finished")
        if token_id in self._skip_ids:
            return ""
        delta = self._decoder.decode(self._tokenizer.token_bytes(token_id))
        if delta:
            self._chunks.append(delta)
        return delta

    def flush(self) -> str:
        """End of sequence: return what is still buffered. A character left incomplete
        becomes U+FFFD, as in the full decode. Later pushes raise."""
        if self._finished:
            return ""
        self._finished = True
        delta = self._decoder.decode(b"", final=True)
        if delta:
            self._chunks.append(delta)
        return delta

    @property
    def has_pending_bytes(self) -> bool:
        """Whether bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every returned delta)."""
        if len(self._chunks) > 1:
            # Collapse so that repeated reads stay cheap.
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""
