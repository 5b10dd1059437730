"""The OpenAI-compatible HTTP API (aiohttp, on the router's event loop), plus /metrics.

POST /v1/chat/completions and /v1/completions (streaming as server-sent events, or not),
GET /v1/models, GET /metrics (Prometheus), GET /health. Errors use OpenAI's body
{"error": {"message", "type", "param", "code"}} with 400/401/403/404/405/413/429/503/504, also
for aiohttp's own (unknown route, wrong method, body over `max_body_bytes`); 429 carries
Retry-After. Bodies are parsed as UTF-8 JSON whatever the Content-Type says. A streamed
response starts only when the first event is ready, so every error before the first token
still gets its status code; a later failure is sent as an SSE
`{"error": ...}` event (the openai client raises it) and the stream ends without [DONE].
A client that disconnects cancels its request (handler cancellation), which aborts it on the
worker. Deadline: header `X-Request-Timeout-Ms` (else the server's maximum).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from services.router import openai_schema as schema
from services.router.auth import Authenticator, Principal, key_from_headers
from services.router.config import RouterConfig
from services.router.domain import Chunk, Final, GenerateRequest, Tier
from services.router.errors import InvalidArgument, RateLimited, RouterError, Unauthenticated
from services.router.metrics import RouterMetrics
from services.router.routing import Router
from services.router.tracing import trace_carrier

logger = logging.getLogger(__name__)

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_body(exc: RouterError) -> dict:
    """OpenAI's error object; `param` names the request body's field ("temperature", not
    the internal "sampling.temperature")."""
    body = exc.openai_body()
    param = body["error"]["param"]
    if param and param.startswith("sampling."):
        body["error"]["param"] = param.removeprefix("sampling.")
    return body


def error_response(exc: RouterError) -> web.Response:
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return web.json_response(error_body(exc), status=exc.http_status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    try:
        return await handler(request)
    except RouterError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except Exception:  # reported as a 500 without internals
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response({"error": {"message": "internal server error",
                                            "type": "server_error", "param": None,
                                            "code": None}}, status=500)


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (no route, wrong method, body too large) in OpenAI's shape."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    body = {"error": {"message": exc.text or exc.reason, "type": "invalid_request_error",
                      "param": None, "code": _HTTP_CODES.get(exc.status)}}
    return web.json_response(body, status=exc.status, headers=headers)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class OpenAIApi:
    def __init__(self, router: Router, auth: Authenticator, config: RouterConfig,
                 metrics: RouterMetrics):
        self.router = router
        self.auth = auth
        self.config = config
        self.metrics = metrics

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors],
                              client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/health", self.health)
        return app

    def _principal(self, request: web.Request) -> Principal:
        try:
            return self.auth.authenticate(key_from_headers(request.headers.items()))
        except UnicodeError:
            # aiohttp hands non-UTF-8 header bytes over as surrogate escapes, which no key is.
            exc = Unauthenticated("invalid API key")
            self.metrics.rejections.labels(type(exc).__name__.lower()).inc()
            raise exc from None
        except RouterError as exc:
            self.metrics.rejections.labels(type(exc).__name__.lower()).inc()
            raise

    @staticmethod
    async def _body(request: web.Request) -> dict:
        raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
        try:
            # JSON is UTF-8 (RFC 8259); a charset parameter is not trusted (an unknown one
            # would raise LookupError). ValueError covers integer literals past Python's digit
            # limit, RecursionError nesting past the interpreter's recursion limit.
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidArgument("body", "is not valid UTF-8") from None
        except RecursionError:
            raise InvalidArgument("body", "is nested too deeply") from None
        except ValueError as exc:
            raise InvalidArgument("body", f"is not valid JSON ({str(exc)[:200]})") from None
        if not isinstance(body, dict):
            raise InvalidArgument("body", "must be a JSON object")
        return body

    @staticmethod
    def _deadline(request: web.Request) -> float | None:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return None
        try:
            # ASCII only: float() also reads "\u0661\u0662" (Arabic-Indic 12) and "1_000".
            ms = float(raw) if raw.isascii() and "_" not in raw else float("nan")
        except ValueError:
            ms = float("nan")
        if not (math.isfinite(ms) and ms > 0):
            raise InvalidArgument(TIMEOUT_HEADER, f"must be a positive number, got {raw!r}")
        return time.monotonic() + ms / 1000.0

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        principal = self._principal(request)
        body = await self._body(request)
        rid = uuid.uuid4().hex
        parse = schema.parse_chat if chat else schema.parse_completion
        req = parse(body, request_id=rid, tenant=principal.tenant.name,
                    permission_scope=principal.tenant.permission_scope,
                    deadline=self._deadline(request))
        include_usage = schema.stream_include_usage(body)
        req = dataclasses.replace(req, trace_carrier=trace_carrier(request.headers.items()))
        events = self.router.generate(req)
        if req.stream:
            return await self._stream(request, events, req, rid, chat, include_usage)
        chunks: list[Chunk] = []
        final: Final | None = None
        async for event in events:
            if isinstance(event, Chunk):
                chunks.append(event)
            else:
                final = event
        build = schema.chat_completion if chat else schema.text_completion
        return web.json_response(build(rid, req, chunks, final))

    async def _stream(self, request: web.Request, events: AsyncIterator, req: GenerateRequest,
                      rid: str, chat: bool, include_usage: bool) -> web.StreamResponse:
        shaper = schema.StreamShaper(chat, rid, req)
        first = await anext(events)  # errors before output -> a plain JSON error response
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        event = first
        try:
            try:
                await resp.prepare(request)  # the client may already be gone: close `events`
                while True:
                    if isinstance(event, Chunk):
                        await resp.write(_sse(shaper.chunk(event)))
                    else:
                        await resp.write(_sse(shaper.final(event)))
                        if include_usage:
                            await resp.write(_sse(shaper.usage(event)))
                        await resp.write(b"data: [DONE]\n\n")
                        break
                    event = await anext(events)
            except RouterError as exc:
                await resp.write(_sse(error_body(exc)))
            await resp.write_eof()
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
            # The client left mid-stream (or right after the last event): nobody to answer, and
            # not a server error. Closing `events` below cancels the upstream call, so the
            # worker frees the request's KV blocks.
            logger.info("stream %s: client disconnected", rid)
        finally:
            await events.aclose()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        principal = self._principal(request)
        configured = {t.tier for t in self.config.tiers}
        names = [schema.AUTO_MODEL] + [t.label for t in Tier
                                       if t in configured and t in principal.tenant.allowed_tiers]
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "switchyard"} for n in names]})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})
