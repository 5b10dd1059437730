"""OpenTelemetry tracing shared by every service: config, exporters, W3C propagation over gRPC.

Each service builds one `Telemetry` from a `TracingConfig` at start-up (never at import) and
takes its tracer from it. The provider is not installed globally, so several services can run
in one test process with separate pipelines. Spans leave through a BatchSpanProcessor: export
runs on its own thread with a bounded queue (spans are dropped, never waited on, when the
collector is slow or down), so tracing cannot block or fail a request.

Propagation: W3C `traceparent` / `tracestate` in gRPC metadata (client interceptors inject the
current context; servers call `extract_context(context.invocation_metadata())`), and the same
header on the router's HTTP API.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, ConsoleSpanExporter,
                                            SpanExporter, SpanExportResult)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TracingConfig:
    """How a service exports spans. exporter: "none", "console", "file" or "otlp"."""

    service_name: str
    exporter: str = "none"
    otlp_endpoint: str | None = None
    """host:port of an OTLP/gRPC collector (exporter "otlp")."""
    file_path: str | None = None
    """JSON-lines file, one span per line (exporter "file"); `trace_view` reads it."""
    sample_ratio: float = 1.0
    """Share of new traces recorded; a request that arrives with a sampled parent follows it."""
    export_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ValueError(f"tracing exporter must be one of {sorted(EXPORTERS)}, "
                             f"got {self.exporter!r}")
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"tracing sample_ratio must be in [0, 1], got {self.sample_ratio}")
        if self.exporter == "otlp" and not self.otlp_endpoint:
            raise ValueError("tracing exporter 'otlp' needs otlp_endpoint (host:port)")
        if self.exporter == "file" and not self.file_path:
            raise ValueError("tracing exporter 'file' needs file_path")
        if self.export_timeout_s <= 0:
            raise ValueError(f"tracing export_timeout_s must be > 0, got {self.export_timeout_s}")


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """A compact JSON-able form of a finished span (what the file exporter writes)."""
    ctx = span.get_span_context()
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
                   for e in span.events],
    }


class FileSpanExporter(SpanExporter):
    """Appends spans as JSON lines; safe for several processes appending to one file (each
    line is written with one O_APPEND write)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_to_dict(s), default=str) + "\n" for s in spans)
        try:
            with self._lock, open(self.path, "a", encoding="utf-8") as f:
                f.write(data)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _otlp(cfg: TracingConfig) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=cfg.otlp_endpoint, insecure=True,
                            timeout=cfg.export_timeout_s)


EXPORTERS: dict[str, Callable[[TracingConfig], SpanExporter | None]] = {
    "none": lambda cfg: None,
    "console": lambda cfg: ConsoleSpanExporter(service_name=cfg.service_name),
    "file": lambda cfg: FileSpanExporter(cfg.file_path),
    "otlp": _otlp,
}


class Telemetry:
    """One service's tracing pipeline."""

    def __init__(self, cfg: TracingConfig) -> None:
        self.config = cfg
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        exporter = EXPORTERS[cfg.exporter](cfg)
        if exporter is not None:
            self.provider.add_span_processor(BatchSpanProcessor(
                exporter, max_queue_size=4096, schedule_delay_millis=500,
                export_timeout_millis=int(cfg.export_timeout_s * 1000)))
        self.tracer = self.provider.get_tracer(f"switchyard.{cfg.service_name}")

    def shutdown(self) -> None:
        """Flushes what is queued (bounded by the export timeout) and stops the exporter."""
        self.provider.shutdown()


def disabled(service_name: str) -> Telemetry:
    """A pipeline that records nothing (the default when a service is not configured)."""
    return Telemetry(TracingConfig(service_name=service_name))


# ----- propagation -------------------------------------------------------------------------

def extract_context(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The remote parent carried in gRPC metadata or HTTP headers (empty context if none)."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    return _PROPAGATOR.extract(carrier)


def inject_metadata(metadata: Sequence[tuple[str, str]] | None = None,
                    ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    """`metadata` plus traceparent/tracestate for the current (or given) span context."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return list(metadata or ()) + list(carrier.items())


def _with_trace(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        method=details.method, timeout=details.timeout,
        metadata=grpc.aio.Metadata(*inject_metadata(tuple(details.metadata or ()))),
        credentials=details.credentials, wait_for_ready=details.wait_for_ready)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_trace(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_trace(details), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for `grpc.aio.insecure_channel(..., interceptors=...)` that carry the
    current trace context to the server."""
    return [_UnaryUnary(), _UnaryStream()]


def server_span(tracer: trace.Tracer, name: str, grpc_context, attributes=None):
    """Starts a SERVER span whose parent is the caller's (from the gRPC metadata); use as a
    context manager around the handler."""
    parent = extract_context(grpc_context.invocation_metadata())
    return tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER,
                                        attributes=attributes)
