"""A test OTLP/gRPC trace receiver on loopback: collects what services export, as dicts."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        got = []
        for rs in request.resource_spans:
            service = _attrs(rs.resource.attributes).get("service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append({
                        "service": service, "name": s.name, "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_id": s.parent_span_id.hex() or None,
                        "kind": s.kind, "start_ns": s.start_time_unix_nano,
                        "end_ns": s.end_time_unix_nano, "status": s.status.code,
                        "attributes": _attrs(s.attributes),
                        "events": [{"name": e.name, "time_ns": e.time_unix_nano,
                                    "attributes": _attrs(e.attributes)} for e in s.events],
                    })
        with self.lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()


class OTLPReceiver:
    """Start/stop a receiver on a fixed loopback port (restartable on the same port)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.collector = _Collector()
        self.server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self.collector, self.server)
        assert self.server.add_insecure_port(self.endpoint) == self.port
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None

    def spans(self) -> list[dict]:
        with self.collector.lock:
            return list(self.collector.spans)

    def wait_for(self, pred, timeout: float = 20.0) -> list[dict]:
        """Polls until `pred(spans)` holds; returns the spans (asserts on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if pred(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got {[(s['service'], s['name']) for s in spans]}")
            time.sleep(0.1)
