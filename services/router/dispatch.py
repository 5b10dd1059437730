"""Placing a request on a worker: replica choice, retries before the first message, tier
fallback, and relaying the worker's stream.

A request commits to a replica when the worker's first message arrives; nothing has been sent
to the client before that, so any failure up to then is retried on another replica (or the next
tier of the plan). After it, failures end the stream. Closing the relay (client cancel, deadline)
cancels the worker call, which aborts the request on the worker and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry.trace import SpanKind
from switchyard.common.v1 import common_pb2

from services.router import convert
from services.router.balancer import Balancer
from services.router.domain import (
    Chunk,
    FinishReason,
    GenerateRequest,
    RouteInfo,
    Sampling,
    Tier,
    Timings,
    Usage,
)
from services.router.errors import (
    DeadlineExceeded,
    InvalidArgument,
    Overloaded,
    RouterError,
    Unavailable,
    WorkerFailed,
)
from services.router.replicas import Replica
from services.router.tracing import RequestTrace, end_error

logger = logging.getLogger(__name__)

_RETRY_EJECT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.UNIMPLEMENTED}
"""Before the first message: try another replica and take this one out of rotation."""
_RETRY_KEEP = {grpc.StatusCode.RESOURCE_EXHAUSTED}
"""Before the first message: try another replica; this one is only full."""


@dataclass(frozen=True)
class WorkerDone:
    """The worker's Complete message."""

    finish_reason: FinishReason
    stop_reason: str
    usage: Usage
    model_id: str
    worker_timings: Timings


def invalid_argument(details: str) -> InvalidArgument:
    """Keeps the worker's "field: message" shape."""
    field, sep, message = details.partition(": ")
    return InvalidArgument(field, message) if sep else InvalidArgument("request", details)


def _error(code: grpc.StatusCode, details: str) -> RouterError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid_argument(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("deadline exceeded while the worker was generating")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"worker is full: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"worker unavailable: {details}")
    return WorkerFailed(f"worker failed ({code.name}): {details}")


def _status_of(err: common_pb2.Error) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == err.code),
                grpc.StatusCode.INTERNAL)


def _end(span, error: BaseException | None) -> None:
    if span is None:
        return
    if error is not None:
        if isinstance(error, grpc.aio.AioRpcError):
            span.set_attribute("rpc.grpc.status_code", error.code().value[0])
        end_error(span, error)
    span.end()


async def _first_message(call, replica: Replica):
    """The call's first message; UNAVAILABLE when the replica is ejected meanwhile (a frozen
    worker accepts calls but never answers: its load stream going stale ejects it, and the
    request moves on instead of waiting for its deadline)."""
    read = asyncio.ensure_future(call.read())
    ejected = replica.ejected_signal()
    try:
        await asyncio.wait((read, ejected), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        read.cancel()
        raise
    if read.done():
        return read.result()
    read.cancel()
    raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                               grpc.aio.Metadata(),
                               f"replica ejected while waiting for its first message: "
                               f"{ejected.result()}")


class Dispatcher:
    def __init__(self, balancer: Balancer, max_attempts: int):
        self.balancer = balancer
        self.max_attempts = max_attempts

    async def run(self, req: GenerateRequest, plan: tuple[Tier, ...], route: RouteInfo,
                  deadline: float, sampling: Sampling | None = None,
                  trace: RequestTrace | None = None) -> AsyncIterator[Chunk | WorkerDone]:
        """Streams the answer of the first replica of `plan`'s tiers that accepts the request.

        Updates `route` (tier, replica, model, attempted tiers, fallback, retries) as it goes.
        """
        attempts = skipped = 0
        tried: set[Replica] = set()
        last: RouterError | None = None
        for i, tier in enumerate(plan):
            calls_on_tier = 0
            if tier not in route.attempted_tiers:
                route.attempted_tiers.append(tier)
            while attempts < self.max_attempts:
                choice = self.balancer.pick(tier, req.affinity_text, tried)
                if choice is None:
                    break
                replica = choice.replica
                tried.add(replica)
                attempts += 1
                calls_on_tier += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded("deadline exceeded before a replica was reached")
                wid = f"{req.request_id}.{uuid.uuid4().hex[:8]}"
                span = trace.child("router.worker.generate", SpanKind.CLIENT, {
                    "switchyard.tier": tier.label, "switchyard.replica": replica.name,
                    "switchyard.attempt": attempts, "switchyard.worker_request_id": wid,
                    "switchyard.pick_reason": choice.reason}) if trace else None
                call = replica.stub.Generate(
                    convert.worker_request(req, wid, sampling), timeout=remaining,
                    metadata=RequestTrace.metadata(span) if span else None)
                replica.in_flight += 1
                try:
                    first = await _first_message(call, replica)
                    if first is not grpc.aio.EOF and first.WhichOneof("kind") == "error":
                        e = first.error
                        raise grpc.aio.AioRpcError(_status_of(e), grpc.aio.Metadata(),
                                                   grpc.aio.Metadata(), e.message)
                except grpc.aio.AioRpcError as exc:
                    replica.in_flight -= 1
                    call.cancel()
                    _end(span, exc)
                    last = self._failed_before_output(replica, exc)
                    continue
                except BaseException as exc:
                    replica.in_flight -= 1
                    call.cancel()
                    _end(span, exc)
                    raise
                if first is grpc.aio.EOF:  # a worker must send complete or error; treat as dead
                    replica.in_flight -= 1
                    replica.eject("Generate ended without a message")
                    last = Unavailable(f"replica {replica.name} ended the stream without output")
                    _end(span, last)
                    continue
                route.tier, route.replica = tier, replica.name
                route.model_id = replica.model_id
                route.fallback = i > 0
                route.retries += attempts - 1 + skipped
                logger.debug("%s -> %s (%s, %s)", req.request_id, replica.name, tier.label,
                             choice.reason)
                try:
                    async for event in self._relay(replica, call, first):
                        yield event
                except BaseException as exc:
                    _end(span, exc)
                    raise
                _end(span, None)
                return
            if calls_on_tier == 0:
                skipped += 1
            if attempts >= self.max_attempts:
                break
        if last is not None and not isinstance(last, (Unavailable, WorkerFailed)):
            raise last
        names = ", ".join(t.label for t in plan)
        detail = f"; last error: {last.message}" if last is not None else ""
        raise Unavailable(f"no healthy replica could serve the request (tiers tried: {names}, "
                          f"attempts: {attempts}){detail}")

    def _failed_before_output(self, replica: Replica, exc: grpc.aio.AioRpcError) -> RouterError:
        code, details = exc.code(), exc.details() or ""
        err = _error(code, details)
        if code in _RETRY_EJECT:
            replica.eject(f"Generate failed before output: {code.name} {details}")
        elif code not in _RETRY_KEEP:
            raise err  # the request's own fault, or its deadline: no retry
        logger.info("retrying elsewhere: replica %s failed before output (%s)", replica.name,
                    code.name)
        return err

    async def _relay(self, replica: Replica, call, first) -> AsyncIterator[Chunk | WorkerDone]:
        try:
            msg = first
            while msg is not grpc.aio.EOF:
                kind = msg.WhichOneof("kind")
                if kind == "chunk":
                    yield convert.chunk_from_worker(msg.chunk)
                elif kind == "complete":
                    c = msg.complete
                    t = c.timings
                    yield WorkerDone(FinishReason(c.finish_reason), c.stop_reason,
                                     convert.usage(c.usage), c.model_id,
                                     Timings(t.queue_ms, t.ttft_ms, t.decode_ms, t.total_ms))
                else:
                    raise _error(_status_of(msg.error), msg.error.message)
                msg = await call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                replica.eject(f"Generate failed mid-stream: {exc.details()}")
            raise _error(exc.code(), exc.details() or "") from None
        finally:
            replica.in_flight -= 1
            call.cancel()  # no-op once finished; otherwise aborts the worker's request
