"""The router's side of the response cache: Lookup before routing, Store after a finished
answer. Fails open: any error or timeout reads as CACHE_RESULT_UNAVAILABLE / not stored.

Scope: tenant and permission scope from the caller's credentials, prompt_version from the
request, model_version from the config, and as model_id the *route* the client asked for
("auto" or a tier name): the lookup happens before the router picks a tier, so an answer is
shared between requests that asked for the same thing, whichever replica produced it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from opentelemetry.trace import SpanKind
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc

from services.common.grpc_options import Keepalive, channel_options
from services.common.tls import ClientTls, aio_channel
from services.router import convert
from services.router.config import CacheClientConfig
from services.router.domain import (
    CacheMode,
    CacheResult,
    FinishReason,
    GenerateRequest,
    Tier,
    Usage,
)
from services.router.tracing import RequestTrace

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    token_ids: tuple[int, ...]
    usage: Usage
    tier: Tier | None
    model_id: str
    finish_reason: FinishReason
    stop_reason: str


@dataclass(frozen=True)
class LookupResult:
    result: CacheResult
    similarity: float = 0.0
    answer: CachedAnswer | None = None
    reason: str = ""


def route_model(req: GenerateRequest) -> str:
    """The cache scope's model_id: what the client asked for."""
    return "auto" if req.tier_hint is None else req.tier_hint.label


def _bypass_reason(req: GenerateRequest, store: bool) -> str | None:
    policy = req.cache
    mode = policy.mode if policy else CacheMode.UNSPECIFIED
    if mode == CacheMode.DISABLED:
        return "policy: disabled"
    if not store and mode == CacheMode.STORE_ONLY:
        return "policy: store_only"
    if store and mode == CacheMode.LOOKUP_ONLY:
        return "policy: lookup_only"
    if req.sampling.logprobs is not None:
        return "logprobs requested"
    return None


def deterministic(req: GenerateRequest) -> bool:
    """Greedy requests, or sampled ones whose policy opts in to caching."""
    t = req.sampling.temperature
    return (t is not None and t == 0.0) or bool(req.cache and req.cache.allow_sampled)


class CacheClient:
    def __init__(self, config: CacheClientConfig, keepalive: Keepalive | None = None,
                 tls: ClientTls | None = None):
        """`tls`: TLS / mTLS of the channel to the cache (config tls.cache); None: plaintext."""
        self.config = config
        self.channel = aio_channel(config.target, channel_options(keepalive), tls, "tls.cache.")
        self.stub = cache_pb2_grpc.CacheServiceStub(self.channel)
        self._stores: set[asyncio.Task] = set()

    async def close(self) -> None:
        if self._stores:
            await asyncio.wait(self._stores, timeout=1.0)
        await self.channel.close(grace=None)

    def _timeout(self, deadline: float) -> float:
        return max(0.0, min(self.config.timeout_ms / 1000.0, deadline - time.monotonic()))

    def _query(self, req: GenerateRequest) -> cache_pb2.CacheQuery:
        return convert.cache_query(req, route_model(req), self.config.model_version)

    async def lookup(self, req: GenerateRequest, deadline: float,
                     trace: RequestTrace | None = None) -> LookupResult:
        why = _bypass_reason(req, store=False)
        if why is not None:
            return LookupResult(CacheResult.BYPASSED, reason=why)
        timeout = self._timeout(deadline)
        if timeout <= 0:
            return LookupResult(CacheResult.UNAVAILABLE, reason="no time left for a lookup")
        msg = cache_pb2.LookupRequest(query=self._query(req))
        if req.cache is not None:
            msg.policy.CopyFrom(convert.cache_policy(req.cache))
        span = trace.child("router.cache.lookup", SpanKind.CLIENT) if trace else None
        try:
            resp = await self.stub.Lookup(msg, timeout=timeout,
                                          metadata=RequestTrace.metadata(span) if span else None)
        except grpc.aio.AioRpcError as exc:
            logger.debug("cache lookup failed: %s %s", exc.code().name, exc.details())
            if span is not None:
                span.set_attribute("switchyard.cache.result", "unavailable")
                span.end()
            return LookupResult(CacheResult.UNAVAILABLE, reason=f"cache {exc.code().name}")
        result = CacheResult(resp.result)
        if span is not None:
            span.set_attribute("switchyard.cache.result", result.name.lower())
            span.set_attribute("switchyard.cache.similarity", float(resp.similarity))
            span.end()
        if not result.is_hit:
            return LookupResult(result, resp.similarity, reason=resp.reason)
        e = resp.entry
        return LookupResult(result, resp.similarity, CachedAnswer(
            text=e.text, token_ids=tuple(e.token_ids), usage=convert.usage(e.usage),
            tier=Tier(e.tier) if e.tier else None, model_id=e.model_id,
            finish_reason=FinishReason(e.finish_reason), stop_reason=e.stop_reason))

    def store_later(self, req: GenerateRequest, answer: CachedAnswer,
                    trace: RequestTrace | None = None) -> None:
        """Stores a finished answer in the background (never delays the response)."""
        if _bypass_reason(req, store=True) is not None or not deterministic(req):
            return
        if answer.finish_reason not in (FinishReason.STOP, FinishReason.LENGTH):
            return
        span = trace.child("router.cache.store", SpanKind.CLIENT) if trace else None
        task = asyncio.create_task(self._store(req, answer, span))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def _store(self, req: GenerateRequest, answer: CachedAnswer, span) -> None:
        msg = cache_pb2.StoreRequest(query=self._query(req), entry=convert.cache_entry(answer))
        if req.cache is not None:
            msg.policy.CopyFrom(convert.cache_policy(req.cache))
        try:
            resp = await self.stub.Store(msg, timeout=self.config.timeout_ms / 1000.0 * 4,
                                         metadata=RequestTrace.metadata(span) if span else None)
            if not resp.stored:
                logger.debug("cache did not store %s: %s", req.request_id, resp.reason)
            if span is not None:
                span.set_attribute("switchyard.cache.stored", resp.stored)
        except grpc.aio.AioRpcError as exc:
            logger.debug("cache store failed: %s", exc.code().name)
            if span is not None:
                span.set_attribute("switchyard.cache.stored", False)
        finally:
            if span is not None:
                span.end()
