"""Range checks on a domain request, before it costs a cache lookup or a worker call.

The worker validates again (it alone knows its context window and logprobs cap); these catch
what is wrong for every worker, with the same field paths.
"""

from __future__ import annotations

import math

from services.router.domain import GenerateRequest
from services.router.errors import InvalidArgument

_RANGES = {
    "temperature": (0.0, math.inf, "must be >= 0"),
    "top_p": (1e-12, 1.0, "must be in (0, 1]"),
    "min_p": (0.0, 1.0, "must be in [0, 1]"),
    "repetition_penalty": (1e-12, 2.0, "must be in (0, 2]"),
    "presence_penalty": (-2.0, 2.0, "must be in [-2, 2]"),
    "frequency_penalty": (-2.0, 2.0, "must be in [-2, 2]"),
}


def validate_request(req: GenerateRequest, max_prompt_chars: int) -> None:
    if req.max_tokens < 1:
        raise InvalidArgument("max_tokens", f"must be >= 1, got {req.max_tokens}")
    if req.prompt is not None:
        if not req.prompt:
            raise InvalidArgument("prompt", "must not be empty")
        size = len(req.prompt)
    else:
        if not req.messages:
            raise InvalidArgument("chat.messages", "must hold at least one message")
        size = sum(len(m.content) for m in req.messages)
    if size > max_prompt_chars:
        raise InvalidArgument("prompt", f"is {size} characters; the limit is {max_prompt_chars}")
    s = req.sampling
    for name, (lo, hi, text) in _RANGES.items():
        value = getattr(s, name)
        if value is not None and not (math.isfinite(value) and lo <= value <= hi):
            raise InvalidArgument(f"sampling.{name}", f"{text}, got {value}")
    if s.top_k is not None and s.top_k < 1:
        raise InvalidArgument("sampling.top_k", "must be >= 1 when set (unset turns it off)")
    if any(not stop for stop in s.stop):
        raise InvalidArgument("sampling.stop", "stop strings must not be empty")
    p = req.cache
    if p is not None and p.min_similarity is not None and not 0.0 <= p.min_similarity <= 1.0:
        raise InvalidArgument("cache.min_similarity", f"must be in [0, 1], got {p.min_similarity}")
