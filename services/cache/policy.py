"""What a request's cache policy allows, resolved against the server's defaults.

The server may be stricter than a request asks, never looser: min_similarity below the
server's threshold is raised to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.cache.config import CacheConfig
from services.cache.domain import CacheMode, InvalidArgument, Policy, Query
from services.cache.keys import is_sampled


@dataclass(frozen=True)
class Decision:
    """The resolved policy of one request."""

    lookup: bool
    """Whether the cache may serve this request."""
    store: bool
    """Whether this request's answer may be stored."""
    semantic: bool
    """Whether semantic hits may be served (exact ones always may, when lookup is allowed)."""
    threshold: float
    """Minimum cosine similarity of a semantic hit."""
    lookup_reason: str = ""
    """Why lookup is not allowed; empty when it is."""
    store_reason: str = ""
    """Why storing is not allowed; empty when it is."""


def decide(query: Query, policy: Policy, config: CacheConfig) -> Decision:
    """Resolves `policy` for `query`. Raises InvalidArgument for an out-of-range policy."""
    ms = policy.min_similarity
    if ms is not None and not (math.isfinite(ms) and 0.0 <= ms <= 1.0):
        raise InvalidArgument("policy.min_similarity", f"must be in [0, 1], got {ms}")
    threshold = max(config.similarity_threshold, ms or 0.0)
    semantic = config.semantic_enabled and (
        config.semantic_by_default if policy.allow_semantic is None else policy.allow_semantic)
    mode = config.default_mode if policy.mode == CacheMode.UNSPECIFIED else policy.mode
    refusal = ""
    if query.sampling.logprobs is not None:
        refusal = "logprobs requested"
    elif is_sampled(query.sampling, config.default_temperature) and not policy.allow_sampled:
        refusal = "sampled request without allow_sampled"
    if refusal:
        return Decision(False, False, semantic, threshold, refusal, refusal)
    lookup = mode in (CacheMode.ENABLED, CacheMode.LOOKUP_ONLY)
    store = mode in (CacheMode.ENABLED, CacheMode.STORE_ONLY)
    why = f"policy: {mode.name.lower()}"
    return Decision(lookup, store, semantic, threshold,
                    "" if lookup else why, "" if store else why)
