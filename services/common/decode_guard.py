"""Undecodable request bytes answered with INVALID_ARGUMENT instead of grpcio's own UNKNOWN or
INTERNAL.

grpcio deserializes a request before any servicer code runs; when protobuf cannot parse the
bytes, the async server answers UNKNOWN and the sync one INTERNAL ("Exception deserializing
request!"), which reads as a server fault. These interceptors wrap each unary-request handler's
deserializer so a parse failure becomes a marker object, and the handler answers it with
INVALID_ARGUMENT naming the message type. Streaming-request handlers (reflection) are left as
they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc


class _Undecodable:
    """What the wrapped deserializer returns for bytes protobuf cannot parse."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends, by design
            return _Undecodable(f"{type(exc).__name__}: {str(exc)[:200]}")
    return deserialize


def _message(method: str, bad: _Undecodable) -> str:
    return f"request: the bytes sent to {method} are not a valid request message ({bad.error})"


def _wrap_aio(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
            return await inner(request, context)
        return grpc.unary_unary_rpc_method_handler(
            unary, _safe(handler.request_deserializer), handler.response_serializer)
    inner = handler.unary_stream
    if inspect.isasyncgenfunction(inner):
        async def stream(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
            async for item in inner(request, context):
                yield item
    else:  # a coroutine that writes with context.write
        async def stream(request, context):
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
            return await inner(request, context)
    return grpc.unary_stream_rpc_method_handler(
        stream, _safe(handler.request_deserializer), handler.response_serializer)


def _wrap_sync(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        def unary(request, context):
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
            return inner(request, context)
        return grpc.unary_unary_rpc_method_handler(
            unary, _safe(handler.request_deserializer), handler.response_serializer)
    inner = handler.unary_stream

    def stream(request, context):
        if isinstance(request, _Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _message(method, request))
        yield from inner(request, context)
    return grpc.unary_stream_rpc_method_handler(
        stream, _safe(handler.request_deserializer), handler.response_serializer)


def _unary_request(handler: grpc.RpcMethodHandler | None) -> bool:
    return handler is not None and not handler.request_streaming


class AioDecodeGuard(grpc.aio.ServerInterceptor):
    """For grpc.aio servers: `grpc.aio.server(interceptors=[AioDecodeGuard()])`."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if not _unary_request(handler):
            return handler
        return _wrap_aio(handler, handler_call_details.method)


class DecodeGuard(grpc.ServerInterceptor):
    """For sync servers: `grpc.server(executor, interceptors=[DecodeGuard()])`."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if not _unary_request(handler):
            return handler
        return _wrap_sync(handler, handler_call_details.method)
