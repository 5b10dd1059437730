"""The router's spans: one SERVER span per request (child of the caller's W3C context from gRPC
metadata or the HTTP `traceparent` header) and CLIENT / INTERNAL children for the cache lookup,
the classifier and each worker attempt. Downstream calls carry the child span's context in their
metadata, so the cache's and the worker's spans hang under the hop that called them.

Spans are never made current: the request path is a chain of async generators, and a context
attached in one may be detached in another when a client cancels. Parents are passed explicitly.
Prompts and answers never become attributes.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.common.telemetry import extract_context, inject_metadata
from services.router.domain import Final, GenerateRequest, RouteInfo
from services.router.slo import Latency

NOOP = trace.NoOpTracer()
TRACE_HEADERS = ("traceparent", "tracestate")


def trace_carrier(headers) -> tuple[tuple[str, str], ...]:
    """The W3C trace headers among gRPC metadata or HTTP headers (names compared lowercase)."""
    return tuple((k.lower(), v) for k, v in headers
                 if isinstance(v, str) and k.lower() in TRACE_HEADERS)


class RequestTrace:
    """Spans of one router request."""

    def __init__(self, tracer: trace.Tracer, req: GenerateRequest) -> None:
        self.tracer = tracer
        self.span = tracer.start_span(
            "router.request", context=extract_context(req.trace_carrier), kind=SpanKind.SERVER,
            attributes={"switchyard.tenant": req.tenant, "switchyard.api": req.api,
                        "switchyard.request_id": req.request_id, "switchyard.stream": req.stream,
                        "gen_ai.request.max_tokens": req.max_tokens})
        self.context = trace.set_span_in_context(self.span)
        self.slo_met: bool | None = None
        self.latency: Latency | None = None

    def child(self, name: str, kind: SpanKind = SpanKind.INTERNAL,
              attributes: dict | None = None) -> Span:
        """A span under this request's root (end it yourself)."""
        return self.tracer.start_span(name, context=self.context, kind=kind, attributes=attributes)

    @staticmethod
    def metadata(span: Span) -> list[tuple[str, str]]:
        """gRPC metadata that makes `span` the parent of the callee's span."""
        return inject_metadata(ctx=trace.set_span_in_context(span))

    def finish(self, route: RouteInfo, final: Final | None, error: BaseException | None) -> None:
        """Records how the request was served (and its SLO verdict) and ends the root span."""
        s = self.span
        s.set_attribute("switchyard.route", route.route)
        if route.tier is not None:
            s.set_attribute("switchyard.tier", route.tier.label)
        if route.replica:
            s.set_attribute("switchyard.replica", route.replica)
        if route.model_id:
            s.set_attribute("gen_ai.response.model", route.model_id)
        s.set_attribute("switchyard.cache.result", route.cache_result.name.lower())
        if route.cache_similarity:
            s.set_attribute("switchyard.cache.similarity", route.cache_similarity)
        if route.difficulty_score is not None:
            s.set_attribute("switchyard.classifier.score", route.difficulty_score)
        if route.classified_tier is not None:
            s.set_attribute("switchyard.classifier.tier", route.classified_tier.label)
        if route.decision_reason:
            s.set_attribute("switchyard.decision_reason", route.decision_reason)
        s.set_attribute("switchyard.retries", route.retries)
        s.set_attribute("switchyard.fallback", route.fallback)
        s.set_attribute("switchyard.attempted_tiers", [t.label for t in route.attempted_tiers])
        if final is not None:
            s.set_attribute("gen_ai.usage.input_tokens", final.usage.prompt_tokens)
            s.set_attribute("gen_ai.usage.output_tokens", final.usage.completion_tokens)
            s.set_attribute("gen_ai.response.finish_reasons", [final.finish_reason.name.lower()])
        if self.slo_met is not None:
            s.set_attribute("switchyard.slo.met", self.slo_met)
        if self.latency is not None:
            s.set_attribute("switchyard.slo.ttft_ms", self.latency.ttft_ms)
            if self.latency.tpot_ms is not None:
                s.set_attribute("switchyard.slo.tpot_ms", self.latency.tpot_ms)
        if error is not None:
            end_error(s, error)
        s.end()


def end_error(span: Span, error: BaseException) -> None:
    """Marks a span failed (a client going away is "cancelled")."""
    kind = ("cancelled" if type(error).__name__ in ("CancelledError", "GeneratorExit")
            else type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, getattr(error, "message", None) or kind))
    span.set_attribute("error.type", kind)
