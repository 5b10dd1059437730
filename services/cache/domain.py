"""Plain data types of the cache service: what the servicer converts protobuf into and out of.

The cache logic (keys, guard, store, index) works on these only and never imports the stubs.
Enum values mirror the contract's numbers so the conversion at the edge is a cast.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class InvalidArgument(ValueError):
    """A malformed request; `field` is the dotted path of the offending field."""

    def __init__(self, field_path: str, message: str):
        super().__init__(f"{field_path}: {message}")
        self.field = field_path


class StoreUnavailable(RuntimeError):
    """Redis failed, timed out, or is being skipped after a recent failure (fail-open)."""


class CacheMode(enum.IntEnum):
    """Whether a request may read from and write to the cache (common.v1.CacheMode)."""

    UNSPECIFIED = 0
    ENABLED = 1
    DISABLED = 2
    LOOKUP_ONLY = 3
    STORE_ONLY = 4


class ResultKind(enum.IntEnum):
    """What a lookup did (common.v1.CacheResult)."""

    MISS = 1
    EXACT = 2
    SEMANTIC = 3
    BYPASSED = 4
    UNAVAILABLE = 5


class FinishReason(enum.IntEnum):
    """Why the cached generation ended (common.v1.FinishReason)."""

    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    ABORT = 3
    ERROR = 4


class Role(enum.IntEnum):
    """Author of a chat message (common.v1.Role)."""

    UNSPECIFIED = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3
    TOOL = 4


@dataclass(frozen=True)
class Scope:
    """The isolation boundary: a request only hits entries stored with an equal scope."""

    tenant: str = ""
    permission_scope: str = ""
    model_id: str = ""
    model_version: str = ""
    prompt_version: str = ""


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: Role
    content: str
    name: str = ""


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None = unset (the worker's default)."""

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
class Query:
    """Everything about a request that decides its answer. Exactly one of prompt / messages."""

    scope: Scope
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    max_tokens: int = 0
    add_generation_prompt: bool | None = None


@dataclass(frozen=True)
class Policy:
    """A request's cache policy; unset fields take the server's defaults."""

    mode: CacheMode = CacheMode.UNSPECIFIED
    allow_sampled: bool = False
    allow_semantic: bool | None = None
    min_similarity: float | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts of the original generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Answer:
    """A finished answer as stored and served (cache.v1.CacheEntry)."""

    text: str
    token_ids: tuple[int, ...] = ()
    usage: Usage = field(default_factory=Usage)
    tier: int = 0
    model_id: str = ""
    finish_reason: FinishReason = FinishReason.STOP
    created_unix_ms: float = 0.0
    stop_reason: str = ""


@dataclass(frozen=True)
class LookupOutcome:
    """Result of a lookup; `answer` and `entry_id` are set only for EXACT and SEMANTIC."""

    kind: ResultKind
    answer: Answer | None = None
    entry_id: str = ""
    similarity: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class StoreOutcome:
    """Result of a store; `reason` says why not, when not stored."""

    stored: bool
    entry_id: str = ""
    reason: str = ""


class InvalidateKind(enum.Enum):
    """What an invalidation removes."""

    TENANT = "tenant"
    MODEL_VERSION = "model_version"
    PROMPT_VERSION = "prompt_version"
    ENTRY_ID = "entry_id"


@dataclass(frozen=True)
class InvalidateTarget:
    """One invalidation; `tenant_filter` only with MODEL_VERSION / PROMPT_VERSION."""

    kind: InvalidateKind
    value: str
    tenant_filter: str = ""


@dataclass(frozen=True)
class CacheStats:
    """Counters since start (entries: current), per tenant or for all (tenant = "")."""

    entries: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    stores: int = 0
    dropped_stores: int = 0
    redis_errors: int = 0
    evictions: int = 0
    redis_available: bool = False
