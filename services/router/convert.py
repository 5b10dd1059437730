"""Protobuf <-> domain conversion for the router, worker and cache contracts: the only module
(with the servicer) that knows the stubs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from switchyard.cache.v1 import cache_pb2
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2
from switchyard.worker.v1 import worker_pb2

from services.router.domain import (
    ROLES,
    CacheMode,
    CachePolicy,
    Chunk,
    Final,
    GenerateRequest,
    Message,
    RouteInfo,
    Sampling,
    Tier,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from services.router.errors import InvalidArgument

if TYPE_CHECKING:
    from services.router.cache_client import CachedAnswer

_ROLE_FROM_PB = {common_pb2.ROLE_SYSTEM: "system", common_pb2.ROLE_USER: "user",
                 common_pb2.ROLE_ASSISTANT: "assistant", common_pb2.ROLE_TOOL: "tool"}
_ROLE_TO_PB = {v: k for k, v in _ROLE_FROM_PB.items()}
_OPTIONAL_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "seed", "logprobs")
assert set(ROLES) == set(_ROLE_TO_PB)
MAX_REQUEST_ID_CHARS = 128
"""A client's request_id travels to the worker as a label, which the worker caps at 256."""


def _opt(msg, name: str):
    return getattr(msg, name) if msg.HasField(name) else None


# --- router requests -------------------------------------------------------------------------

def sampling_from_pb(s: common_pb2.SamplingParams) -> Sampling:
    return Sampling(**{n: _opt(s, n) for n in _OPTIONAL_SAMPLING}, stop=tuple(s.stop),
                    stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos)


def messages_from_pb(conv: common_pb2.Conversation, path: str = "chat") -> tuple[Message, ...]:
    out = []
    for i, m in enumerate(conv.messages):
        role = _ROLE_FROM_PB.get(m.role)
        if role is None:
            raise InvalidArgument(f"{path}.messages[{i}].role", "must be set to a known role")
        out.append(Message(role, m.content, m.name))
    return tuple(out)


def request_from_pb(pb: router_pb2.GenerateRequest, *, request_id: str, tenant: str,
                    permission_scope: str, stream: bool,
                    deadline: float | None) -> GenerateRequest:
    """A router GenerateRequest -> domain request (shape only; validation.py checks ranges)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} "
                              f"characters, got {len(request_id)}")
    which = pb.WhichOneof("input")
    if which is None:
        raise InvalidArgument("input", "one of prompt or chat is required")
    cache = None
    if pb.HasField("cache"):
        p = pb.cache
        try:
            mode = CacheMode(p.mode)
        except ValueError:
            raise InvalidArgument("cache.mode", f"unknown value {p.mode}") from None
        cache = CachePolicy(mode=mode, allow_sampled=p.allow_sampled,
                            allow_semantic=_opt(p, "allow_semantic"),
                            min_similarity=_opt(p, "min_similarity"))
    hint = None
    if pb.tier_hint:
        try:
            hint = Tier(pb.tier_hint)
        except ValueError:
            raise InvalidArgument("tier_hint", f"unknown tier {pb.tier_hint}") from None
    return GenerateRequest(
        request_id=request_id, tenant=tenant, permission_scope=permission_scope,
        max_tokens=pb.max_tokens,
        prompt=pb.prompt if which == "prompt" else None,
        messages=messages_from_pb(pb.chat) if which == "chat" else None,
        add_generation_prompt=_opt(pb, "add_generation_prompt"),
        sampling=sampling_from_pb(pb.sampling), tier_hint=hint, cache=cache,
        prompt_version=pb.prompt_version, labels=tuple(sorted(pb.labels.items())),
        stream=stream, deadline=deadline, api="grpc")


# --- shared pieces ---------------------------------------------------------------------------

def sampling_to_pb(s: Sampling) -> common_pb2.SamplingParams:
    kwargs = {n: getattr(s, n) for n in _OPTIONAL_SAMPLING if getattr(s, n) is not None}
    return common_pb2.SamplingParams(stop=s.stop, stop_token_ids=s.stop_token_ids,
                                     ignore_eos=s.ignore_eos, **kwargs)


def conversation_to_pb(messages: tuple[Message, ...]) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[
        common_pb2.ChatMessage(role=_ROLE_TO_PB[m.role], content=m.content, name=m.name)
        for m in messages])


def usage(u: common_pb2.Usage) -> Usage:
    return Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)


def usage_to_pb(u: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                            cached_prompt_tokens=u.cached_prompt_tokens)


# --- worker ----------------------------------------------------------------------------------

def worker_request(req: GenerateRequest, worker_request_id: str,
                   sampling: Sampling | None = None) -> worker_pb2.GenerateRequest:
    msg = worker_pb2.GenerateRequest(
        request_id=worker_request_id, max_tokens=req.max_tokens,
        sampling=sampling_to_pb(sampling or req.sampling),
        labels={**dict(req.labels), "tenant": req.tenant, "router_request_id": req.request_id})
    if req.prompt is not None:
        msg.prompt = req.prompt
    else:
        msg.chat.CopyFrom(conversation_to_pb(req.messages or ()))
    if req.add_generation_prompt is not None:
        msg.add_generation_prompt = req.add_generation_prompt
    return msg


def chunk_from_worker(c: worker_pb2.Chunk) -> Chunk:
    if not c.logprobs:
        return Chunk(c.text, tuple(c.token_ids))
    lps = tuple(TokenLogprob(lp.token_id, lp.logprob,
                             tuple(TopLogprob(t.token_id, t.logprob, t.text) for t in lp.top))
                for lp in c.logprobs)
    return Chunk(c.text, tuple(c.token_ids), lps)


# --- router responses ------------------------------------------------------------------------

def _logprobs_to_pb(lps: tuple[TokenLogprob, ...]) -> list[common_pb2.TokenLogprob]:
    return [common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top=[
        common_pb2.TopLogprob(token_id=t.token_id, logprob=t.logprob, text=t.text)
        for t in lp.top]) for lp in lps]


def chunk_to_pb(c: Chunk) -> router_pb2.GenerateResponse:
    return router_pb2.GenerateResponse(chunk=router_pb2.Chunk(
        text=c.text, token_ids=c.token_ids, logprobs=_logprobs_to_pb(c.logprobs)))


def route_to_pb(r: RouteInfo) -> router_pb2.RouteInfo:
    msg = router_pb2.RouteInfo(
        tier=int(r.tier or 0), replica=r.replica, model_id=r.model_id,
        cache_result=int(r.cache_result), cache_similarity=r.cache_similarity,
        classified_tier=int(r.classified_tier or 0), decision_reason=r.decision_reason,
        fallback=r.fallback, attempted_tiers=[int(t) for t in r.attempted_tiers],
        retries=r.retries)
    if r.difficulty_score is not None:
        msg.difficulty_score = r.difficulty_score
    return msg


def timings_to_pb(t: Timings) -> common_pb2.Timings:
    return common_pb2.Timings(queue_ms=t.queue_ms, ttft_ms=t.ttft_ms, decode_ms=t.decode_ms,
                              total_ms=t.total_ms)


def final_to_pb(f: Final) -> router_pb2.GenerateResponse:
    return router_pb2.GenerateResponse(final=router_pb2.Final(
        finish_reason=int(f.finish_reason), stop_reason=f.stop_reason, usage=usage_to_pb(f.usage),
        timings=timings_to_pb(f.timings), route=route_to_pb(f.route), request_id=f.request_id))


def complete_to_pb(chunks: list[Chunk], f: Final) -> router_pb2.CompleteResponse:
    lps = tuple(lp for c in chunks for lp in c.logprobs)
    return router_pb2.CompleteResponse(
        text="".join(c.text for c in chunks), token_ids=[t for c in chunks for t in c.token_ids],
        logprobs=_logprobs_to_pb(lps), finish_reason=int(f.finish_reason),
        stop_reason=f.stop_reason, usage=usage_to_pb(f.usage), timings=timings_to_pb(f.timings),
        route=route_to_pb(f.route), request_id=f.request_id)


# --- cache -----------------------------------------------------------------------------------

def cache_policy(p: CachePolicy) -> common_pb2.CachePolicy:
    msg = common_pb2.CachePolicy(mode=int(p.mode), allow_sampled=p.allow_sampled)
    if p.allow_semantic is not None:
        msg.allow_semantic = p.allow_semantic
    if p.min_similarity is not None:
        msg.min_similarity = p.min_similarity
    return msg


def cache_query(req: GenerateRequest, model_id: str, model_version: str) -> cache_pb2.CacheQuery:
    q = cache_pb2.CacheQuery(
        scope=cache_pb2.CacheScope(tenant=req.tenant, permission_scope=req.permission_scope,
                                   model_id=model_id, model_version=model_version,
                                   prompt_version=req.prompt_version),
        sampling=sampling_to_pb(req.sampling), max_tokens=req.max_tokens)
    if req.prompt is not None:
        q.prompt = req.prompt
    else:
        q.chat.CopyFrom(conversation_to_pb(req.messages or ()))
    if req.add_generation_prompt is not None:
        q.add_generation_prompt = req.add_generation_prompt
    return q


def cache_entry(a: CachedAnswer) -> cache_pb2.CacheEntry:
    return cache_pb2.CacheEntry(
        text=a.text, token_ids=a.token_ids, usage=usage_to_pb(a.usage), tier=int(a.tier or 0),
        model_id=a.model_id, finish_reason=int(a.finish_reason), stop_reason=a.stop_reason)
