from switchyard.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheScope(_message.Message):
    __slots__ = ("tenant", "permission_scope", "model_id", "model_version", "prompt_version")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PERMISSION_SCOPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    permission_scope: str
    model_id: str
    model_version: str
    prompt_version: str
    def __init__(self, tenant: _Optional[str] = ..., permission_scope: _Optional[str] = ..., model_id: _Optional[str] = ..., model_version: _Optional[str] = ..., prompt_version: _Optional[str] = ...) -> None: ...

class CacheQuery(_message.Message):
    __slots__ = ("scope", "prompt", "chat", "sampling", "max_tokens", "add_generation_prompt")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    prompt: str
    chat: _common_pb2.Conversation
    sampling: _common_pb2.SamplingParams
    max_tokens: int
    add_generation_prompt: bool
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., prompt: _Optional[str] = ..., chat: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_tokens: _Optional[int] = ..., add_generation_prompt: _Optional[bool] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("query", "policy")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    query: CacheQuery
    policy: _common_pb2.CachePolicy
    def __init__(self, query: _Optional[_Union[CacheQuery, _Mapping]] = ..., policy: _Optional[_Union[_common_pb2.CachePolicy, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("result", "entry", "entry_id", "similarity", "reason")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    result: _common_pb2.CacheResult
    entry: CacheEntry
    entry_id: str
    similarity: float
    reason: str
    def __init__(self, result: _Optional[_Union[_common_pb2.CacheResult, str]] = ..., entry: _Optional[_Union[CacheEntry, _Mapping]] = ..., entry_id: _Optional[str] = ..., similarity: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class CacheEntry(_message.Message):
    __slots__ = ("text", "token_ids", "usage", "tier", "model_id", "finish_reason", "created_unix_ms", "stop_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    usage: _common_pb2.Usage
    tier: _common_pb2.Tier
    model_id: str
    finish_reason: _common_pb2.FinishReason
    created_unix_ms: float
    stop_reason: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ..., model_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., created_unix_ms: _Optional[float] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("query", "entry", "policy")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    query: CacheQuery
    entry: CacheEntry
    policy: _common_pb2.CachePolicy
    def __init__(self, query: _Optional[_Union[CacheQuery, _Mapping]] = ..., entry: _Optional[_Union[CacheEntry, _Mapping]] = ..., policy: _Optional[_Union[_common_pb2.CachePolicy, _Mapping]] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("stored", "entry_id", "reason")
    STORED_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    entry_id: str
    reason: str
    def __init__(self, stored: _Optional[bool] = ..., entry_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("tenant", "model_version", "prompt_version", "entry_id", "tenant_filter")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FILTER_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model_version: str
    prompt_version: str
    entry_id: str
    tenant_filter: str
    def __init__(self, tenant: _Optional[str] = ..., model_version: _Optional[str] = ..., prompt_version: _Optional[str] = ..., entry_id: _Optional[str] = ..., tenant_filter: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("entries", "exact_hits", "semantic_hits", "misses", "stores", "dropped_stores", "redis_errors", "evictions", "redis_available")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    EXACT_HITS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    DROPPED_STORES_FIELD_NUMBER: _ClassVar[int]
    REDIS_ERRORS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    REDIS_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    entries: int
    exact_hits: int
    semantic_hits: int
    misses: int
    stores: int
    dropped_stores: int
    redis_errors: int
    evictions: int
    redis_available: bool
    def __init__(self, entries: _Optional[int] = ..., exact_hits: _Optional[int] = ..., semantic_hits: _Optional[int] = ..., misses: _Optional[int] = ..., stores: _Optional[int] = ..., dropped_stores: _Optional[int] = ..., redis_errors: _Optional[int] = ..., evictions: _Optional[int] = ..., redis_available: _Optional[bool] = ...) -> None: ...
