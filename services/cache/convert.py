"""Protobuf <-> domain conversion for the cache contract: the only module that knows both."""

from __future__ import annotations

from switchyard.cache.v1 import cache_pb2
from switchyard.common.v1 import common_pb2

from services.cache.domain import (
    Answer,
    CacheMode,
    CacheStats,
    FinishReason,
    InvalidArgument,
    InvalidateKind,
    InvalidateTarget,
    LookupOutcome,
    Message,
    Policy,
    Query,
    Role,
    Sampling,
    Scope,
    StoreOutcome,
    Usage,
)


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


def _enum(cls, value: int, field: str):
    try:
        return cls(value)
    except ValueError:
        raise InvalidArgument(field, f"unknown value {value}") from None


def sampling_from_pb(s: common_pb2.SamplingParams) -> Sampling:
    """SamplingParams -> Sampling (unset optionals become None)."""
    return Sampling(
        temperature=_opt(s, "temperature"), top_p=_opt(s, "top_p"), top_k=_opt(s, "top_k"),
        min_p=_opt(s, "min_p"), repetition_penalty=_opt(s, "repetition_penalty"),
        presence_penalty=_opt(s, "presence_penalty"),
        frequency_penalty=_opt(s, "frequency_penalty"), seed=_opt(s, "seed"),
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), logprobs=_opt(s, "logprobs"),
        ignore_eos=s.ignore_eos)


def query_from_pb(request_has_query: bool, q: cache_pb2.CacheQuery) -> Query:
    """CacheQuery -> Query. Raises InvalidArgument when the query or its input is missing."""
    if not request_has_query:
        raise InvalidArgument("query", "is required")
    s = q.scope
    scope = Scope(s.tenant, s.permission_scope, s.model_id, s.model_version, s.prompt_version)
    kind = q.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("query.input", "one of prompt or chat is required")
    prompt = q.prompt if kind == "prompt" else None
    messages = None
    if kind == "chat":
        messages = tuple(
            Message(_enum(Role, m.role, f"query.chat.messages[{i}].role"), m.content, m.name)
            for i, m in enumerate(q.chat.messages))
    return Query(scope=scope, prompt=prompt, messages=messages,
                 sampling=sampling_from_pb(q.sampling), max_tokens=q.max_tokens,
                 add_generation_prompt=_opt(q, "add_generation_prompt"))


def policy_from_pb(present: bool, p: common_pb2.CachePolicy) -> Policy:
    """CachePolicy -> Policy; an absent policy is all defaults."""
    if not present:
        return Policy()
    return Policy(mode=_enum(CacheMode, p.mode, "policy.mode"), allow_sampled=p.allow_sampled,
                  allow_semantic=_opt(p, "allow_semantic"),
                  min_similarity=_opt(p, "min_similarity"))


def answer_from_pb(e: cache_pb2.CacheEntry) -> Answer:
    """CacheEntry -> Answer (created_unix_ms is ignored: the cache sets it)."""
    # Tiers are open proto3 enums: refuse one no reader knows, or every later hit on this
    # entry would fail in the router that reads it.
    if e.tier not in common_pb2.Tier.values():
        raise InvalidArgument("entry.tier", f"unknown value {e.tier}")
    u = e.usage
    return Answer(text=e.text, token_ids=tuple(e.token_ids),
                  usage=Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens),
                  tier=e.tier, model_id=e.model_id,
                  finish_reason=_enum(FinishReason, e.finish_reason, "entry.finish_reason"),
                  stop_reason=e.stop_reason)


def answer_to_pb(a: Answer) -> cache_pb2.CacheEntry:
    """Answer -> CacheEntry."""
    u = a.usage
    return cache_pb2.CacheEntry(
        text=a.text, token_ids=list(a.token_ids),
        usage=common_pb2.Usage(prompt_tokens=u.prompt_tokens,
                               completion_tokens=u.completion_tokens,
                               cached_prompt_tokens=u.cached_prompt_tokens),
        tier=a.tier, model_id=a.model_id, finish_reason=int(a.finish_reason),
        created_unix_ms=a.created_unix_ms, stop_reason=a.stop_reason)


def lookup_to_pb(o: LookupOutcome) -> cache_pb2.LookupResponse:
    """LookupOutcome -> LookupResponse."""
    resp = cache_pb2.LookupResponse(result=int(o.kind), entry_id=o.entry_id,
                                    similarity=o.similarity, reason=o.reason)
    if o.answer is not None:
        resp.entry.CopyFrom(answer_to_pb(o.answer))
    return resp


def store_to_pb(o: StoreOutcome) -> cache_pb2.StoreResponse:
    """StoreOutcome -> StoreResponse."""
    return cache_pb2.StoreResponse(stored=o.stored, entry_id=o.entry_id, reason=o.reason)


def target_from_pb(r: cache_pb2.InvalidateRequest) -> InvalidateTarget:
    """InvalidateRequest -> InvalidateTarget. Raises InvalidArgument without a target."""
    kind = r.WhichOneof("target")
    if kind is None:
        raise InvalidArgument("target", "one of tenant, model_version, prompt_version or "
                              "entry_id is required")
    return InvalidateTarget(InvalidateKind(kind), getattr(r, kind), r.tenant_filter)


def stats_to_pb(s: CacheStats) -> cache_pb2.StatsResponse:
    """CacheStats -> StatsResponse."""
    return cache_pb2.StatsResponse(
        entries=s.entries, exact_hits=s.exact_hits, semantic_hits=s.semantic_hits,
        misses=s.misses, stores=s.stores, dropped_stores=s.dropped_stores,
        redis_errors=s.redis_errors, evictions=s.evictions, redis_available=s.redis_available)
