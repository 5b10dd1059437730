"""Seeded benchmark prompts of exact token lengths, cut from real English text.

The corpus is Python's own help text (`pydoc_data.topics.topics`, every topic in key order),
so it ships with the interpreter and never changes under a fixed Python version. Each prompt is a
slice of the corpus's token ids, decoded to text (workers receive text, not ids) and re-encoded to
check its length. Prompts start at distinct corpus offsets, so no two share a first KV block and
the worker's prefix cache cannot flatter the results (unless `shared_prefix_tokens` asks for it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from services.worker.tokenizer import Tokenizer

LENGTH_TOLERANCE = 2
"""Largest accepted difference between a prompt's re-encoded length and its target."""


@dataclass(frozen=True)
class Workload:
    """A seeded request mix: prompt lengths drawn uniformly, a fixed output length."""

    name: str
    min_prompt_tokens: int
    max_prompt_tokens: int
    output_tokens: int


WORKLOADS = {
    "decode-heavy": Workload("decode-heavy", 32, 256, 256),
    "prefill-heavy": Workload("prefill-heavy", 100, 700, 128),
}


@dataclass(frozen=True)
class Prompt:
    text: str
    target_tokens: int
    """Length the prompt was cut to (shared prefix included)."""
    encoded_tokens: int
    """Length of the text re-encoded by the tokenizer (the worker reports its own count too)."""


class PromptFactory:
    """Hands out prompts from consecutive, non-overlapping regions of the corpus."""

    def __init__(self, tokenizer: Tokenizer, shared_prefix_tokens: int = 0) -> None:
        from pydoc_data.topics import topics

        self.tokenizer = tokenizer
        corpus = "\n\n".join(topics[key] for key in sorted(topics))
        self.ids = tokenizer.encode(corpus, add_special_tokens=False)  # ~113k tokens
        # The shared prefix (if any) is the corpus's first K tokens; prompts start after it.
        self.prefix_ids = self.ids[:shared_prefix_tokens]
        self.cursor = shared_prefix_tokens
        self.bos = 1 if tokenizer.add_bos_token else 0

    def take_ids(self, length: int) -> list[int]:
        """The next `length` unused corpus token ids."""
        if self.cursor + length > len(self.ids):
            # Corpus exhausted: wrap. Offsets stay distinct in practice (odd stride).
            self.cursor = (self.cursor + 7919) % max(1, len(self.ids) // 2)
        out = self.ids[self.cursor:self.cursor + length]
        self.cursor += length
        return out

    def make(self, num_tokens: int) -> Prompt:
        """A prompt of `num_tokens` body tokens (+ the shared prefix), as the worker counts them."""
        body = max(1, num_tokens - self.bos)
        ids = self.prefix_ids + self.take_ids(body)
        target = len(ids) + self.bos
        text = self.tokenizer.decode(ids)
        for _ in range(3):  # decode/encode can merge or split a token at the cut; trim to fit
            encoded = len(self.tokenizer.encode(text))
            if encoded <= target:
                break
            ids = ids[:len(ids) - (encoded - target)]
            text = self.tokenizer.decode(ids)
        encoded = len(self.tokenizer.encode(text))
        if abs(encoded - target) > LENGTH_TOLERANCE:
            raise AssertionError(f"prompt re-encodes to {encoded} tokens, wanted {target}")
        return Prompt(text, target, encoded)


def prompt_lengths(workload: Workload, num_requests: int, seed: int) -> list[int]:
    """Seeded uniform prompt lengths; the same seed gives the same lengths for every run."""
    rng = random.Random(f"{seed}:{workload.name}")
    return [rng.randint(workload.min_prompt_tokens, workload.max_prompt_tokens)
            for _ in range(num_requests)]
