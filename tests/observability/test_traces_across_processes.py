"""One trace across separate processes (client -> router -> cache and worker -> engine events),
exported over OTLP/gRPC to a test receiver; a forced preemption shows up in the trace; a dead
collector changes nothing for clients."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common.telemetry import Telemetry, TracingConfig, inject_metadata
from tests.cache.conftest import RedisServer, free_port
from tests.observability.otlp_receiver import OTLPReceiver
from tests.worker.conftest import smollm2_gguf_reader, smollm2_tokenizer, tiny_model_dir  # noqa: F401

ENV = dict(os.environ, OMP_NUM_THREADS="1", SWITCHYARD_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1")
SERVER_KIND = 2  # OTLP Span.SpanKind SPAN_KIND_SERVER


def _wait_serving(target: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"{target} never became SERVING"
            time.sleep(0.2)


class Proc:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _worker_args(model_dir, port: int, endpoint: str, *extra: str) -> list[str]:
    return ["-m", "services.worker", "--model", str(model_dir), "--port", str(port),
            "--max-model-len", "512", "--trace-exporter", "otlp", "--otlp-endpoint", endpoint,
            *extra]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    """Receiver, Redis, a cache process and two worker processes (one with a tiny KV pool)."""
    receiver = OTLPReceiver(free_port())
    receiver.start()
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    redis.start()
    ports = {"cache": free_port(), "worker": free_port(), "tight": free_port(),
             "router": free_port(), "router_http": free_port(), "tight_metrics": free_port()}
    router_yaml = tmp_path_factory.mktemp("router") / "router.yaml"
    router_yaml.write_text(f"""
grpc_port: {ports["router"]}
http_port: {ports["router_http"]}
tiers:
  small: {{replicas: ["127.0.0.1:{ports["worker"]}"], slo: {{ttft_ms: 60000, tpot_ms: 60000}}}}
tenants:
  acme: {{api_keys: [sk-acme-0123456789]}}
cache: {{target: "127.0.0.1:{ports["cache"]}", timeout_ms: 2000}}
balancer: {{load_interval_ms: 100}}
tracing: {{exporter: otlp, otlp_endpoint: "{receiver.endpoint}"}}
""")
    procs = [
        Proc(["-m", "services.cache", "--redis-url", redis.url, "--port", str(ports["cache"]),
              "--trace-exporter", "otlp", "--otlp-endpoint", receiver.endpoint]),
        Proc(_worker_args(tiny_model_dir, ports["worker"], receiver.endpoint,
                          "--num-kv-blocks", "64")),
        # 8 blocks of 16 tokens: two requests of ~60 + 40 tokens cannot both fit
        Proc(_worker_args(tiny_model_dir, ports["tight"], receiver.endpoint,
                          "--num-kv-blocks", "8", "--no-prefix-caching",
                          "--metrics-port", str(ports["tight_metrics"]))),
        Proc(["-m", "services.router", "--config", str(router_yaml)]),
    ]
    try:
        for name in ports:
            if name not in ("router_http", "tight_metrics"):
                _wait_serving(f"127.0.0.1:{ports[name]}")
        yield receiver, {k: f"127.0.0.1:{v}" for k, v in ports.items()}
    finally:
        for p in procs:
            p.stop()
        redis.stop()
        receiver.stop()


def _query(text: str) -> cache_pb2.CacheQuery:
    return cache_pb2.CacheQuery(
        scope=cache_pb2.CacheScope(tenant="acme", model_id="tiny", model_version="v1"),
        chat=common_pb2.Conversation(messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]),
        sampling=common_pb2.SamplingParams(temperature=0.0), max_tokens=8)


def _generate(target: str, rid: str, prompt: str, max_tokens: int, metadata=None):
    with grpc.insecure_channel(target) as ch:
        stub = worker_pb2_grpc.WorkerServiceStub(ch)
        msgs = list(stub.Generate(worker_pb2.GenerateRequest(
            request_id=rid, prompt=prompt, max_tokens=max_tokens,
            sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)),
            metadata=metadata, timeout=60))
    return msgs[-1].complete


def test_one_trace_across_client_cache_and_worker(cluster):
    receiver, addr = cluster
    client = Telemetry(TracingConfig(service_name="client", exporter="otlp",
                                     otlp_endpoint=receiver.endpoint))
    with client.tracer.start_as_current_span("client.request") as root:
        md = inject_metadata()
        with grpc.insecure_channel(addr["cache"]) as ch:
            cache = cache_pb2_grpc.CacheServiceStub(ch)
            assert cache.Lookup(cache_pb2.LookupRequest(query=_query("hello?")),
                                metadata=md).result == common_pb2.CACHE_RESULT_MISS
            final = _generate(addr["worker"], "traced", "The weather today is", 6, md)
            cache.Store(cache_pb2.StoreRequest(query=_query("hello?"), entry=cache_pb2.CacheEntry(
                text="hi", usage=final.usage, model_id=final.model_id,
                finish_reason=final.finish_reason)), metadata=md)
    client.shutdown()
    trace_id = f"{root.get_span_context().trace_id:032x}"
    root_id = f"{root.get_span_context().span_id:016x}"

    def complete(spans):
        names = {(s["service"], s["name"]) for s in spans if s["trace_id"] == trace_id}
        return {("client", "client.request"), ("cache", "cache.Lookup"), ("cache", "cache.Store"),
                ("worker", "worker.Generate")} <= names

    spans = [s for s in receiver.wait_for(complete) if s["trace_id"] == trace_id]
    by_name = {s["name"]: s for s in spans}
    for name in ("cache.Lookup", "cache.Store", "worker.Generate"):
        assert by_name[name]["parent_id"] == root_id, name
        assert by_name[name]["kind"] == SERVER_KIND
    assert by_name["cache.Lookup"]["attributes"]["switchyard.cache.result"] == "miss"
    gen = by_name["worker.Generate"]
    a = gen["attributes"]
    assert a["gen_ai.request.model"] == final.model_id
    assert a["gen_ai.usage.input_tokens"] == final.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == 6
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    names = [e["name"] for e in gen["events"]]
    assert names[0] == "engine.queued" and names[-1] == "engine.finished"
    assert {"engine.scheduled", "engine.prefill_chunk", "engine.first_token"} <= set(names)


def _preemptions(metrics_addr: str) -> float:
    """The worker's own count of preemptions, from its Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("switchyard_worker_num_preemptions_total"))


def test_preemption_appears_in_the_trace(cluster):
    receiver, addr = cluster
    results = {}

    def run(rid, prompt, barrier):
        barrier.wait()
        results[rid] = _generate(addr["tight"], rid, prompt, 40)

    # ~42 prompt tokens each: both prefills fit in 8 blocks, their growth to ~82 tokens does not.
    # Whether they overlap is up to the OS scheduler (the tiny model finishes one in a blink), so
    # rounds of two simultaneous requests go on until the worker's own counter shows a preemption.
    for round_ in range(10):
        before = _preemptions(addr["tight_metrics"])
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=run, args=(f"p{round_}{tag}", " ".join(
            f"{word}{i}" for i in range(16)), barrier)) for tag, word in (("a", "alpha"),
                                                                         ("b", "beta"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if _preemptions(addr["tight_metrics"]) > before:
            break
    else:
        pytest.fail("ten rounds of two overlapping requests never preempted on an 8-block pool")
    assert {r.usage.completion_tokens for r in results.values()} == {40}

    def preempted(spans):
        return any(e["name"] == "engine.resumed" for s in spans if s["name"] == "worker.Generate"
                   and s["attributes"].get("gen_ai.response.id") in results for e in s["events"])

    spans = receiver.wait_for(preempted)
    victim = next(s for s in spans if s["name"] == "worker.Generate"
                  and any(e["name"] == "engine.resumed" for e in s["events"]))
    events = {e["name"]: e for e in victim["events"]}
    lost = events["engine.preempted"]["attributes"]["computed_tokens"]
    assert lost > 0
    assert events["engine.resumed"]["attributes"]["recomputed_tokens"] == lost
    assert victim["attributes"]["switchyard.preemptions"] >= 1
    assert victim["attributes"]["switchyard.recomputed_tokens"] >= lost


def test_a_dead_collector_changes_nothing_for_clients(cluster):
    receiver, addr = cluster
    receiver.stop()
    try:
        for i in range(3):
            start = time.monotonic()
            final = _generate(addr["worker"], f"dark-{i}", "Once upon a time", 5)
            assert final.usage.completion_tokens == 5
            assert time.monotonic() - start < 10.0
    finally:
        receiver.start()  # same port: the exporters reconnect
    _generate(addr["worker"], "after", "Once upon a time", 3)
    receiver.wait_for(lambda spans: any(s["attributes"].get("gen_ai.response.id") == "after"
                                        for s in spans))


def test_one_trace_from_the_router_through_cache_and_worker(cluster):
    receiver, addr = cluster
    client = Telemetry(TracingConfig(service_name="client", exporter="otlp",
                                     otlp_endpoint=receiver.endpoint))
    with client.tracer.start_as_current_span("client.call") as root:
        md = inject_metadata([("authorization", "Bearer sk-acme-0123456789")])
        with grpc.insecure_channel(addr["router"]) as ch:
            msgs = list(router_pb2_grpc.RouterServiceStub(ch).Generate(router_pb2.GenerateRequest(
                request_id="via-router", prompt="Name three colours of the rainbow.",
                max_tokens=4, sampling=common_pb2.SamplingParams(temperature=0.0)),
                metadata=md, timeout=60))
    client.shutdown()
    final = msgs[-1].final
    assert final.usage.completion_tokens >= 1
    trace_id = f"{root.get_span_context().trace_id:032x}"
    want = {("router", "router.request"), ("router", "router.cache.lookup"),
            ("cache", "cache.Lookup"), ("router", "router.classify"),
            ("router", "router.worker.generate"), ("worker", "worker.Generate"),
            ("router", "router.cache.store"), ("cache", "cache.Store")}

    def complete(spans):
        return want <= {(s["service"], s["name"]) for s in spans if s["trace_id"] == trace_id}

    spans = {s["name"]: s for s in receiver.wait_for(complete) if s["trace_id"] == trace_id}
    ids = {name: s["span_id"] for name, s in spans.items()}
    parent = {name: s["parent_id"] for name, s in spans.items()}
    assert parent["router.request"] == f"{root.get_span_context().span_id:016x}"
    for hop in ("router.cache.lookup", "router.classify", "router.worker.generate",
                "router.cache.store"):
        assert parent[hop] == ids["router.request"], hop
    assert parent["cache.Lookup"] == ids["router.cache.lookup"]
    assert parent["cache.Store"] == ids["router.cache.store"]
    assert parent["worker.Generate"] == ids["router.worker.generate"]
    root_attrs = spans["router.request"]["attributes"]
    assert root_attrs["switchyard.tenant"] == "acme"
    assert root_attrs["switchyard.route"] == "classifier"
    assert root_attrs["switchyard.tier"] == "small"
    assert root_attrs["switchyard.cache.result"] == "miss"
    assert 0.0 <= root_attrs["switchyard.classifier.score"] <= 1.0
    assert root_attrs["switchyard.decision_reason"]
    assert root_attrs["switchyard.retries"] == 0 and root_attrs["switchyard.fallback"] is False
    assert root_attrs["switchyard.slo.met"] is True  # SLO targets of a minute
    assert root_attrs["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
    worker = spans["worker.Generate"]
    assert worker["attributes"]["gen_ai.usage.output_tokens"] == final.usage.completion_tokens
    assert any(e["name"] == "engine.first_token" for e in worker["events"])


def test_http_traceparent_is_honoured(cluster):
    import json
    import urllib.request

    receiver, addr = cluster
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    port = addr["router_http"].rsplit(":", 1)[1]
    body = json.dumps({"model": "small", "prompt": "Hello", "max_tokens": 2,
                       "temperature": 0}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=body, method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-acme-0123456789",
                 "traceparent": f"00-{trace_id}-{parent_id}-01"})
    answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert answer["usage"]["completion_tokens"] >= 1
    # The router's span ends after the response is sent, so it may be exported after the
    # worker's: wait for both.
    spans = receiver.wait_for(lambda spans: {"worker.Generate", "router.request"} <= {
        s["name"] for s in spans if s["trace_id"] == trace_id})
    root = next(s for s in spans if s["trace_id"] == trace_id and s["name"] == "router.request")
    assert root["parent_id"] == parent_id
    assert root["attributes"]["switchyard.api"] == "openai"
    assert root["attributes"]["switchyard.route"] == "hint"
