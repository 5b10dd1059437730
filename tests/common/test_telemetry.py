"""Tracing plumbing: file exporter, W3C propagation over real gRPC (loopback), trace view."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import pytest
from opentelemetry import trace

from services.common import trace_view
from services.common.telemetry import (Telemetry, TracingConfig, client_interceptors,
                                       extract_context, inject_metadata, server_span)


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="'jaeger'"):
        TracingConfig(service_name="x", exporter="jaeger")
    with pytest.raises(ValueError, match="1.5"):
        TracingConfig(service_name="x", sample_ratio=1.5)
    with pytest.raises(ValueError, match="otlp_endpoint"):
        TracingConfig(service_name="x", exporter="otlp")


def test_inject_extract_round_trip(tmp_path):
    tel = Telemetry(TracingConfig(service_name="t", exporter="file",
                                  file_path=str(tmp_path / "s.jsonl")))
    with tel.tracer.start_as_current_span("outer") as span:
        md = inject_metadata([("x-api-key", "k")])
        want = span.get_span_context()
    assert md[0] == ("x-api-key", "k") and any(k == "traceparent" for k, _ in md)
    got = trace.get_current_span(extract_context(md)).get_span_context()
    assert (got.trace_id, got.span_id) == (want.trace_id, want.span_id)
    tel.shutdown()


def test_sample_ratio_zero_records_nothing_but_follows_sampled_parents(tmp_path):
    path = tmp_path / "s.jsonl"
    parent_tel = Telemetry(TracingConfig(service_name="p", exporter="file", file_path=str(path)))
    child_tel = Telemetry(TracingConfig(service_name="c", exporter="file", file_path=str(path),
                                        sample_ratio=0.0))
    with child_tel.tracer.start_as_current_span("alone"):
        pass
    with parent_tel.tracer.start_as_current_span("root"):
        md = inject_metadata()
    with child_tel.tracer.start_as_current_span("child", context=extract_context(md)):
        pass
    parent_tel.shutdown()
    child_tel.shutdown()
    names = [json.loads(line)["name"] for line in path.read_text().splitlines()]
    assert sorted(names) == ["child", "root"]


def test_interceptors_carry_the_trace_over_grpc(tmp_path):
    path = tmp_path / "spans.jsonl"
    client_tel = Telemetry(TracingConfig(service_name="client", exporter="file",
                                         file_path=str(path)))
    server_tel = Telemetry(TracingConfig(service_name="server", exporter="file",
                                         file_path=str(path)))

    async def echo(request: bytes, context) -> bytes:
        with server_span(server_tel.tracer, "server.echo", context):
            return request

    async def stream(request: bytes, context):
        with server_span(server_tel.tracer, "server.stream", context):
            yield request
            yield request

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Stream": grpc.unary_stream_rpc_method_handler(stream)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             interceptors=client_interceptors()) as ch:
            with client_tel.tracer.start_as_current_span("client.call"):
                assert await ch.unary_unary("/t.T/Echo")(b"hi") == b"hi"
                got = [m async for m in ch.unary_stream("/t.T/Stream")(b"x")]
                assert got == [b"x", b"x"]
        await server.stop(None)

    asyncio.run(main())
    client_tel.shutdown()
    server_tel.shutdown()
    spans = {s["name"]: s for s in map(json.loads, path.read_text().splitlines())}
    root = spans["client.call"]
    for name in ("server.echo", "server.stream"):
        assert spans[name]["trace_id"] == root["trace_id"]
        assert spans[name]["parent_id"] == root["span_id"]
        assert spans[name]["service"] == "server" and spans[name]["kind"] == "SERVER"

    out = io.StringIO()
    trace_view.render(trace_view.traces(trace_view.load_spans(path))[root["trace_id"]], out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"trace {root['trace_id']}") and "3 spans" in lines[0]
    assert lines[1].startswith("client: client.call")
    assert lines[2].startswith("  server: server.echo")  # a child, indented under its parent


def test_trace_view_cli(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    span = {"trace_id": "a" * 32, "span_id": "b" * 16, "parent_id": None, "name": "worker.generate",
            "service": "worker", "kind": "SERVER", "start_ns": 0, "end_ns": 2_000_000,
            "status": "UNSET", "attributes": {"gen_ai.usage.output_tokens": 3},
            "events": [{"name": "first_token", "time_ns": 1_000_000, "attributes": {}}]}
    path.write_text(json.dumps(span) + "\n")
    assert trace_view.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "worker: worker.generate" in text and "output_tokens=3" in text
    assert "· first_token" in text and "+     1.0 ms" in text
    assert trace_view.main([str(path), "--trace", "c" * 32]) == 1
