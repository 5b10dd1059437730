"""gRPC servicer of switchyard.cache.v1.CacheService: a thin adapter over ResponseCache.

Converts protobuf to domain types at the edge and maps domain errors to status codes:
InvalidArgument -> INVALID_ARGUMENT; StoreUnavailable (Invalidate only: Lookup and Store fail
open inside the cache) -> UNAVAILABLE.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2

from services.cache import convert
from services.cache.cache import ResponseCache
from services.cache.domain import InvalidArgument, StoreUnavailable
from services.common.telemetry import server_span

logger = logging.getLogger(__name__)

R = TypeVar("R")


def maps_errors(method: Callable[..., R]) -> Callable[..., R]:
    """Runs an RPC method in a SERVER span (child of the caller's, from the W3C context in the
    metadata) and turns domain errors into gRPC status codes."""
    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext) -> R:
        with server_span(self.tracer, f"cache.{method.__name__}", context) as span:
            try:
                return method(self, request, context)
            except InvalidArgument as e:
                span.set_status(Status(StatusCode.ERROR, "INVALID_ARGUMENT"))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except StoreUnavailable as e:
                span.set_status(Status(StatusCode.ERROR, "UNAVAILABLE"))
                context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        raise AssertionError("unreachable: context.abort raises")
    return wrapper


def _scope_attributes(span: trace.Span, request) -> None:
    if request.HasField("query"):
        span.set_attribute("switchyard.tenant", request.query.scope.tenant)
        span.set_attribute("gen_ai.request.model", request.query.scope.model_id)


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Lookup, Store, Invalidate and Stats over one ResponseCache."""

    def __init__(self, cache: ResponseCache, tracer: trace.Tracer | None = None):
        self.cache = cache
        self.tracer = tracer or trace.NoOpTracer()

    @maps_errors
    def Lookup(self, request: cache_pb2.LookupRequest,
               context: grpc.ServicerContext) -> cache_pb2.LookupResponse:
        query = convert.query_from_pb(request.HasField("query"), request.query)
        policy = convert.policy_from_pb(request.HasField("policy"), request.policy)
        response = convert.lookup_to_pb(self.cache.lookup(query, policy))
        span = trace.get_current_span()
        _scope_attributes(span, request)
        result = common_pb2.CacheResult.Name(response.result).removeprefix("CACHE_RESULT_")
        span.set_attribute("switchyard.cache.result", result.lower())
        if response.result in (common_pb2.CACHE_RESULT_EXACT, common_pb2.CACHE_RESULT_SEMANTIC):
            span.set_attribute("switchyard.cache.kind", result.lower())
        span.set_attribute("switchyard.cache.similarity", float(response.similarity))
        if response.reason:
            span.set_attribute("switchyard.cache.reason", response.reason)
        return response

    @maps_errors
    def Store(self, request: cache_pb2.StoreRequest,
              context: grpc.ServicerContext) -> cache_pb2.StoreResponse:
        query = convert.query_from_pb(request.HasField("query"), request.query)
        policy = convert.policy_from_pb(request.HasField("policy"), request.policy)
        if not request.HasField("entry"):
            raise InvalidArgument("entry", "is required")
        answer = convert.answer_from_pb(request.entry)
        _scope_attributes(trace.get_current_span(), request)
        return convert.store_to_pb(self.cache.store_answer(query, answer, policy))

    @maps_errors
    def Invalidate(self, request: cache_pb2.InvalidateRequest,
                   context: grpc.ServicerContext) -> cache_pb2.InvalidateResponse:
        removed = self.cache.invalidate(convert.target_from_pb(request))
        return cache_pb2.InvalidateResponse(removed=removed)

    @maps_errors
    def Stats(self, request: cache_pb2.StatsRequest,
              context: grpc.ServicerContext) -> cache_pb2.StatsResponse:
        return convert.stats_to_pb(self.cache.stats(request.tenant))
