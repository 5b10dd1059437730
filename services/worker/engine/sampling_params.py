"""Per-request sampling and stopping parameters (domain form; the gRPC edge converts protobuf)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.worker.engine.errors import InvalidArgument

MAX_LOGPROBS = 20
"""Most top-k logprobs a request may ask for per token."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Field ranges are checked at construction; checks that need the prompt and the model limits
    live in `validate`. Every failure raises `InvalidArgument` naming the field.
    """

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the fewest top tokens whose probabilities sum to top_p; in (0, 1]."""
    top_k: int | None = None
    """Keep only the k most likely tokens (None: no limit)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """Penalize tokens already seen: positive logits are divided by it, negative ones multiplied.

    Must be > 0; 1 turns it off."""
    presence_penalty: float = 0.0
    """Subtract from logits of tokens already generated, once per token; in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtract from logits of generated tokens, times their count; in [-2, 2]."""
    seed: int | None = None
    """Per-request random seed for reproducible sampling (None: the engine's generator)."""
    stop: tuple[str, ...] = ()
    """Stop strings, matched by the engine's detokenizer (not by the scheduler)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (reported as its stop_reason)."""
    max_tokens: int = 16
    """Most output tokens to generate."""
    logprobs: int | None = None
    """None: no logprobs. k: the sampled token's logprob plus the top k alternatives, k in [0, 20]."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS tokens (benchmarks)."""

    def __post_init__(self) -> None:
        # Accept lists from callers but keep the frozen dataclass hashable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self._check_sampling()
        self._check_penalties()
        self._check_stopping()

    def _check_sampling(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(
                "temperature", f"must be a finite number >= 0, got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidArgument("top_k", f"must be >= 1 when set, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgument("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidArgument("seed", f"must be in [0, 2**63), got {self.seed}")

    def _check_penalties(self) -> None:
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument(
                "repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidArgument(name, f"must be in [-2, 2], got {value}")

    def _check_stopping(self) -> None:
        if self.max_tokens < 1:
            raise InvalidArgument("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidArgument(
                "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"
            )
        if any(not s for s in self.stop):
            raise InvalidArgument("stop", "stop strings must be non-empty")
        bad_ids = [t for t in self.stop_token_ids if t < 0]
        if bad_ids:
            raise InvalidArgument("stop_token_ids", f"token ids must be >= 0, got {bad_ids}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0 or self.top_k == 1

    def validate(self, max_model_len: int, prompt_len: int) -> None:
        """Check the request fits the model: a non-empty prompt and room for max_tokens."""
        if prompt_len < 1:
            raise InvalidArgument("prompt", "prompt must contain at least one token")
        if prompt_len + self.max_tokens > max_model_len:
            raise InvalidArgument(
                "max_tokens",
                f"prompt of {prompt_len} tokens + max_tokens {self.max_tokens} = "
                f"{prompt_len + self.max_tokens} exceeds max_model_len {max_model_len}",
            )
