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
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc

from services.cache import convert
from services.cache.cache import ResponseCache
from services.cache.domain import InvalidArgument, StoreUnavailable

logger = logging.getLogger(__name__)

R = TypeVar("R")


def maps_errors(method: Callable[..., R]) -> Callable[..., R]:
    """Turns domain errors raised by an RPC method into gRPC status codes."""
    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext) -> R:
        try:
            return method(self, request, context)
        except InvalidArgument as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except StoreUnavailable as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        raise AssertionError("unreachable: context.abort raises")
    return wrapper


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Lookup, Store, Invalidate and Stats over one ResponseCache."""

    def __init__(self, cache: ResponseCache):
        self.cache = cache

    @maps_errors
    def Lookup(self, request: cache_pb2.LookupRequest,
               context: grpc.ServicerContext) -> cache_pb2.LookupResponse:
        query = convert.query_from_pb(request.HasField("query"), request.query)
        policy = convert.policy_from_pb(request.HasField("policy"), request.policy)
        return convert.lookup_to_pb(self.cache.lookup(query, policy))

    @maps_errors
    def Store(self, request: cache_pb2.StoreRequest,
              context: grpc.ServicerContext) -> cache_pb2.StoreResponse:
        query = convert.query_from_pb(request.HasField("query"), request.query)
        policy = convert.policy_from_pb(request.HasField("policy"), request.policy)
        if not request.HasField("entry"):
            raise InvalidArgument("entry", "is required")
        answer = convert.answer_from_pb(request.entry)
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
