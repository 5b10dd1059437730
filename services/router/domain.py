"""The router's domain types: requests, stream events and routing records, free of protobuf.

Enums mirror the common.v1 proto enums value for value, so the edges convert with int().
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Tier(enum.IntEnum):
    """A model tier (common.v1.Tier without UNSPECIFIED: "no tier" is None)."""

    SMALL = 1
    QUANTIZED = 2
    LARGE = 3

    @property
    def label(self) -> str:
        """The config / OpenAI name: "small", "quantized" or "large"."""
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Tier:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown tier {name!r}; expected one of "
                             f"{[t.label for t in cls]}") from None


class FinishReason(enum.IntEnum):
    """Why generation ended (common.v1.FinishReason)."""

    STOP = 1
    LENGTH = 2
    ABORT = 3
    ERROR = 4


class CacheResult(enum.IntEnum):
    """What the response cache did (common.v1.CacheResult)."""

    UNSPECIFIED = 0
    MISS = 1
    EXACT = 2
    SEMANTIC = 3
    BYPASSED = 4
    UNAVAILABLE = 5

    @property
    def is_hit(self) -> bool:
        return self in (CacheResult.EXACT, CacheResult.SEMANTIC)


class CacheMode(enum.IntEnum):
    """A request's cache mode (common.v1.CacheMode)."""

    UNSPECIFIED = 0
    ENABLED = 1
    DISABLED = 2
    LOOKUP_ONLY = 3
    STORE_ONLY = 4


ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    """One chat message; role is one of ROLES."""

    role: str
    content: str
    name: str = ""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None = the worker's default (see common.v1.SamplingParams)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class CachePolicy:
    """A request's response-cache policy (common.v1.CachePolicy)."""

    mode: CacheMode = CacheMode.UNSPECIFIED
    allow_sampled: bool = False
    allow_semantic: bool | None = None
    min_similarity: float | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """A validated request, from either front door, after authentication."""

    request_id: str
    tenant: str
    """The authenticated tenant."""
    permission_scope: str
    """The caller's permission scope within the tenant (part of the cache scope)."""
    max_tokens: int
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    """Exactly one of prompt / messages is set."""
    add_generation_prompt: bool | None = None
    sampling: Sampling = field(default_factory=Sampling)
    tier_hint: Tier | None = None
    cache: CachePolicy | None = None
    """None = the server's defaults."""
    prompt_version: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    stream: bool = True
    """False for Complete / non-streaming HTTP (enables the cascade policy)."""
    deadline: float | None = None
    """time.monotonic() by which the request must finish; None = the server's maximum."""
    api: str = "grpc"
    """Front door ("grpc" or "openai"), for metrics."""
    trace_carrier: tuple[tuple[str, str], ...] = ()
    """The caller's W3C trace context (traceparent / tracestate), if it sent one."""

    @property
    def classifier_text(self) -> str:
        """What the difficulty classifier reads: the prompt, or the last user message."""
        if self.prompt is not None:
            return self.prompt
        for m in reversed(self.messages or ()):
            if m.role == "user":
                return m.content
        return self.messages[-1].content if self.messages else ""

    @property
    def affinity_text(self) -> str:
        """The shared prefix a worker may have cached: the system prompt of a chat, or the
        start of a raw prompt."""
        if self.messages:
            first = self.messages[0]
            return first.content if first.role == "system" else ""
        return (self.prompt or "")[:AFFINITY_PROMPT_CHARS]


AFFINITY_PROMPT_CHARS = 256
"""A raw prompt's affinity key is its first this-many characters (covers a few KV blocks)."""


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """Newly generated output."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Milliseconds from the router's arrival (see common.v1.Timings)."""

    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class RouteInfo:
    """How a request was served; filled in as routing proceeds (router.v1.RouteInfo)."""

    tier: Tier | None = None
    replica: str = ""
    model_id: str = ""
    cache_result: CacheResult = CacheResult.UNSPECIFIED
    cache_similarity: float = 0.0
    difficulty_score: float | None = None
    classified_tier: Tier | None = None
    decision_reason: str = ""
    fallback: bool = False
    attempted_tiers: list[Tier] = field(default_factory=list)
    retries: int = 0
    route: str = ""
    """Metrics label: cache, hint, classifier or cascade."""


@dataclass(frozen=True)
class Final:
    """The end of a stream: accounting and routing."""

    finish_reason: FinishReason
    stop_reason: str
    usage: Usage
    timings: Timings
    route: RouteInfo
    request_id: str


Event = Chunk | Final
