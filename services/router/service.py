"""The router's gRPC servicer: a thin adapter from RouterService to Router.generate."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid

import grpc
from switchyard.router.v1 import router_pb2_grpc

from services.common.grpc_errors import maps_errors
from services.router import convert
from services.router.auth import Authenticator, key_from_headers
from services.router.config import RouterConfig
from services.router.domain import Chunk, Final, GenerateRequest
from services.router.errors import InvalidArgument, RateLimited, RouterError
from services.router.metrics import RouterMetrics
from services.router.routing import Router
from services.router.tracing import trace_carrier

MAX_TENANT_CHARS = 128
"""Longer tenant claims are refused unread: errors quote the claim, and a status message past
gRPC's 16 KiB metadata limit never reaches the client (it sees RESOURCE_EXHAUSTED instead)."""


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router, auth: Authenticator, config: RouterConfig,
                 metrics: RouterMetrics):
        self.router = router
        self.auth = auth
        self.config = config
        self.metrics = metrics

    def _request(self, request, context: grpc.aio.ServicerContext,
                 stream: bool) -> GenerateRequest:
        try:
            if len(request.tenant) > MAX_TENANT_CHARS:
                raise InvalidArgument("tenant", f"must be at most {MAX_TENANT_CHARS} "
                                      f"characters, got {len(request.tenant)}")
            key = key_from_headers(context.invocation_metadata() or ())
            principal = self.auth.resolve(key, request.tenant, self.config.trust_tenant_field)
        except RouterError as exc:
            self.metrics.rejections.labels(type(exc).__name__.lower()).inc()
            raise
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        req = convert.request_from_pb(
            request, request_id=request.request_id or uuid.uuid4().hex,
            tenant=principal.tenant.name, permission_scope=principal.tenant.permission_scope,
            stream=stream, deadline=deadline)
        return dataclasses.replace(req, trace_carrier=trace_carrier(
            context.invocation_metadata() or ()))

    @staticmethod
    def _retry_after(context: grpc.aio.ServicerContext, exc: RateLimited) -> None:
        context.set_trailing_metadata((("retry-after", str(max(1, round(exc.retry_after_s)))),))

    @maps_errors
    async def Generate(self, request, context):
        req = self._request(request, context, stream=True)
        try:
            # aclosing: leaving at a yield (the RPC ended) cancels the worker call at once
            async with contextlib.aclosing(self.router.generate(req)) as events:
                async for event in events:
                    yield (convert.chunk_to_pb(event) if isinstance(event, Chunk)
                           else convert.final_to_pb(event))
        except RateLimited as exc:
            self._retry_after(context, exc)
            raise

    @maps_errors
    async def Complete(self, request, context):
        req = self._request(request, context, stream=False)
        chunks: list[Chunk] = []
        final: Final | None = None
        try:
            async for event in self.router.generate(req):
                if isinstance(event, Chunk):
                    chunks.append(event)
                else:
                    final = event
        except RateLimited as exc:
            self._retry_after(context, exc)
            raise
        return convert.complete_to_pb(chunks, final)
