"""Per-request observability of the worker: one SERVER span per Generate call (child of the
caller's span, from the W3C context in the gRPC metadata) with the OpenTelemetry GenAI
attributes and the engine's events, plus the Prometheus request metrics.

Nothing here runs on the engine thread: engine events travel on the request's Completion and are
turned into span events (with their own timestamps) when the request ends. Prompts and outputs
never become attributes; request labels do (they are the caller's routing metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Iterator

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from switchyard.common.v1 import common_pb2
from switchyard.worker.v1 import worker_pb2

from services.common.telemetry import extract_context
from services.worker.engine.output_processor import Completion, StreamEvent
from services.worker.metrics import WorkerMetrics

# GenAI semantic conventions name finish reasons in lower case ("stop", "length", ...).
_FINISH = {v: common_pb2.FinishReason.Name(v).removeprefix("FINISH_REASON_").lower()
           for v in common_pb2.FinishReason.values()}


class RequestObserver:
    """Span and metrics of one Generate call; see `Observability.request`."""

    def __init__(self, span: trace.Span, metrics: WorkerMetrics | None) -> None:
        self.span = span
        self.metrics = metrics
        self._last_token_at: float | None = None

    def on_event(self, event: StreamEvent) -> None:
        """Every event streamed to the client (inter-token latency after the first token)."""
        if not event.token_ids:
            return
        now = time.monotonic()
        if self._last_token_at is not None and self.metrics is not None:
            self.metrics.observe_tokens(now - self._last_token_at, len(event.token_ids))
        self._last_token_at = now

    def on_complete(self, c: Completion, final: worker_pb2.GenerateResponse) -> None:
        reason = _FINISH[final.complete.finish_reason]
        if self.metrics is not None:
            self.metrics.observe_completion(c, reason)
        s = self.span
        s.set_attribute("gen_ai.response.finish_reasons", [reason])
        s.set_attribute("gen_ai.usage.input_tokens", c.prompt_tokens)
        s.set_attribute("gen_ai.usage.output_tokens", c.completion_tokens)
        s.set_attribute("switchyard.usage.cached_prompt_tokens", c.cached_prompt_tokens)
        s.set_attribute("switchyard.preemptions", c.num_preemptions)
        s.set_attribute("switchyard.recomputed_tokens", c.recomputed_tokens)
        s.set_attribute("switchyard.timings.queue_ms", c.timings.queue_ms)
        s.set_attribute("switchyard.timings.ttft_ms", c.timings.ttft_ms)
        s.set_attribute("switchyard.timings.decode_ms", c.timings.decode_ms)
        # Engine events carry the engine's monotonic clock; map them onto wall time now.
        offset_ns = time.time_ns() - int(time.monotonic() * 1e9)
        for e in c.events:
            s.add_event(f"engine.{e.name}", dict(e.attributes),
                        timestamp=offset_ns + int(e.time * 1e9))


class Observability:
    """Tracer plus metrics of one worker process (either may be absent)."""

    def __init__(self, tracer: trace.Tracer, metrics: WorkerMetrics | None, tier: str,
                 worker_id: str) -> None:
        self.tracer = tracer
        self.metrics = metrics
        self.tier = tier
        self.worker_id = worker_id

    @contextlib.contextmanager
    def request(self, req: worker_pb2.GenerateRequest, grpc_context,
                model_id: str) -> Iterator[RequestObserver]:
        """Wraps one Generate call. Exceptions mark the span as an error and propagate."""
        sp = req.sampling
        attrs: dict = {
            "gen_ai.operation.name": "chat" if req.WhichOneof("input") == "chat"
            else "text_completion",
            "gen_ai.system": "switchyard",
            "gen_ai.request.model": model_id,
            "gen_ai.response.model": model_id,
            "gen_ai.request.max_tokens": req.max_tokens,
            "gen_ai.response.id": req.request_id,
            "switchyard.tier": self.tier,
            "switchyard.worker_id": self.worker_id,
        }
        for field, name in (("temperature", "temperature"), ("top_p", "top_p"),
                            ("top_k", "top_k"), ("seed", "seed")):
            if sp.HasField(field):
                attrs[f"gen_ai.request.{name}"] = getattr(sp, field)
        for key, value in req.labels.items():
            attrs[f"switchyard.label.{key}"] = value
        parent = extract_context(grpc_context.invocation_metadata())
        # Not made current: the handler is an async generator, and a context attached in it may
        # be detached in another context when the client cancels (OpenTelemetry then logs
        # "Failed to detach context"). The worker makes no outgoing calls that would need it.
        span = self.tracer.start_span("worker.Generate", context=parent,
                                      kind=trace.SpanKind.SERVER, attributes=attrs)
        try:
            yield RequestObserver(span, self.metrics)
        except BaseException as exc:
            # A client that goes away closes the stream: GeneratorExit / CancelledError.
            kind = ("cancelled" if isinstance(exc, (GeneratorExit, asyncio.CancelledError))
                    else type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, kind))
            span.set_attribute("error.type", kind)
            raise
        finally:
            span.end()
