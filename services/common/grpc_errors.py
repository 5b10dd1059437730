"""Domain errors -> gRPC status codes, in one table and one decorator for every servicer.

Servicers raise domain exceptions (or let them propagate from the engine / cache logic); the
decorator aborts the RPC with the mapped code and the exception's message. Anything unmapped is
logged and reported as INTERNAL without leaking internals to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from typing import Any, Callable

import grpc

logger = logging.getLogger(__name__)

_STATUS: dict[type[BaseException], grpc.StatusCode] = {}


def register_status(exc_type: type[BaseException], code: grpc.StatusCode) -> None:
    """Maps an exception type (and its subclasses) to a status code."""
    _STATUS[exc_type] = code


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return None


MAX_DETAILS_CHARS = 2048
"""Status messages travel in HTTP/2 trailers (16 KiB of metadata by default); one that echoes a
huge input would turn into a misleading RESOURCE_EXHAUSTED on the client, so cut it."""


def _details(message: str) -> str:
    if len(message) <= MAX_DETAILS_CHARS:
        return message
    return message[:MAX_DETAILS_CHARS] + f"... ({len(message) - MAX_DETAILS_CHARS} more chars)"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code = status_for(exc)
    if code is None:
        logger.exception("unhandled error in RPC", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
    await context.abort(code, _details(str(exc)))


_closing: set[asyncio.Task] = set()


def _close_soon(items: Any) -> None:
    """Closes a stream handler's generator from a done callback (on the server's loop)."""
    if items.ag_frame is None:  # ran to its end or already closed: the usual case
        return

    async def close() -> None:
        try:
            await items.aclose()
        except RuntimeError:  # still running: the cancelled handler task's own exit closes it
            pass
        except Exception:  # noqa: BLE001 - a cleanup error must not go unseen
            logger.exception("closing a stream handler failed")

    task = asyncio.get_running_loop().create_task(close())
    _closing.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_closing.discard)


def maps_errors(handler: Callable) -> Callable:
    """Wraps an aio servicer method (unary or server-streaming) with the status mapping."""
    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext):
            items = handler(self, request, context)
            # When an RPC ends during a write (client cancelled, connection lost), grpc aio
            # leaves the handler suspended at its `yield`: nothing resumes or closes it, so its
            # cleanup (aborting engine work, cancelling upstream calls) would wait for garbage
            # collection, and the work behind it ran to the end. Close it when the RPC ends.
            context.add_done_callback(lambda _ctx: _close_soon(items))
            try:
                async with contextlib.aclosing(items):
                    async for item in items:
                        yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped or reported as INTERNAL
                await _abort(context, exc)
        return stream

    @functools.wraps(handler)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)
    return unary
