"""Worker traces and metrics over real gRPC and HTTP (tiny model, file span exporter)."""

from __future__ import annotations

import json
import socket
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.telemetry import Telemetry, TracingConfig, inject_metadata
from services.worker.engine import output_processor as op
from tests.worker.test_worker_grpc import _collect, _req, running_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items())
                                   if k not in ("model_name", "tier"))
            out[key] = s.value
    return out


def test_trace_and_metrics_of_real_requests(tiny_model_dir, tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    metrics_port = _free_port()
    client = Telemetry(TracingConfig(service_name="test-client", exporter="file",
                                     file_path=str(spans_file)))
    tracing = TracingConfig(service_name="worker", exporter="file", file_path=str(spans_file))
    with running_worker(tiny_model_dir, tracing=tracing, metrics_port=metrics_port,
                        max_num_batched_tokens=16) as (stub, _, server, _loop):
        with client.tracer.start_as_current_span("client.request") as root:
            md = inject_metadata([])
            # 17-32 prompt tokens: two prefill chunks of at most 16
            req = _req("traced-1", max_tokens=5, prompt="one two three four five six seven "
                       "eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
                       "eighteen nineteen twenty")
            req.labels["tenant"] = "acme"
            _, final = _collect(stub.Generate(req, metadata=md))
        _collect(stub.Generate(_req("plain-2", max_tokens=3)))
        bad = _req("bad-3", max_tokens=0)
        try:
            _collect(stub.Generate(bad))
            raise AssertionError("max_tokens=0 must be rejected")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        scraped = _scrape(metrics_port)
        server.telemetry.provider.force_flush()
    client.shutdown()

    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    (root_span,) = by_name["client.request"]
    gen = {s["attributes"]["gen_ai.response.id"]: s for s in by_name["worker.Generate"]}
    traced = gen["traced-1"]
    assert traced["trace_id"] == root_span["trace_id"] == f"{root.get_span_context().trace_id:032x}"
    assert traced["parent_id"] == root_span["span_id"]
    assert traced["service"] == "worker" and traced["kind"] == "SERVER"
    a = traced["attributes"]
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == final.complete.model_id
    assert a["gen_ai.request.max_tokens"] == 5 and a["gen_ai.request.temperature"] == 0.0
    assert a["gen_ai.usage.input_tokens"] == final.complete.usage.prompt_tokens
    assert 16 < a["gen_ai.usage.input_tokens"] <= 32
    assert a["gen_ai.usage.output_tokens"] == 5
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["switchyard.tier"] == "small" and a["switchyard.label.tenant"] == "acme"
    names = [e["name"] for e in traced["events"]]
    assert names[:3] == ["engine." + op.EVENT_QUEUED, "engine." + op.EVENT_SCHEDULED,
                         "engine." + op.EVENT_PREFILL_CHUNK]
    assert names.count("engine." + op.EVENT_PREFILL_CHUNK) == 2
    assert names[-2:] == ["engine." + op.EVENT_FIRST_TOKEN, "engine." + op.EVENT_FINISHED]
    times = [e["time_ns"] for e in traced["events"]]
    assert times == sorted(times)
    assert traced["start_ns"] - 5e8 <= times[0] and times[-1] <= traced["end_ns"] + 5e8
    # a request without a caller context starts its own trace; a rejected one is an error span
    assert gen["plain-2"]["trace_id"] != traced["trace_id"] and gen["plain-2"]["parent_id"] is None
    assert gen["bad-3"]["status"] == "ERROR"
    assert gen["bad-3"]["attributes"]["error.type"] == "InvalidArgument"
    for s in by_name["worker.Generate"]:  # prompt text never becomes an attribute
        assert not any("seventeen" in str(v) or "quick brown" in str(v)
                       for v in s["attributes"].values())

    assert scraped["switchyard_worker_request_success_total,finished_reason=length"] == 2
    assert scraped["switchyard_worker_generation_tokens_total"] == 8
    assert scraped["switchyard_worker_e2e_request_latency_seconds_count"] == 2
    assert scraped["switchyard_worker_inter_token_latency_seconds_count"] == (5 - 1) + (3 - 1)
    assert scraped["switchyard_worker_num_requests_running"] == 0
    assert scraped["switchyard_worker_request_prompt_tokens_sum"] == \
        a["gen_ai.usage.input_tokens"] + gen["plain-2"]["attributes"]["gen_ai.usage.input_tokens"]
