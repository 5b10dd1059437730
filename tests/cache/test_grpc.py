"""The gRPC surface: CacheService over loopback, status codes, health, reflection, metrics,
and the command line."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2

from services.cache.__main__ import parse_args
from services.cache.domain import CacheMode
from services.cache.server import SERVICE_NAME, CacheServer
from tests.cache.conftest import FUNCTIONAL_TIMEOUT_S, free_port


def query(text: str, tenant: str = "acme", **sampling) -> cache_pb2.CacheQuery:
    return cache_pb2.CacheQuery(
        scope=cache_pb2.CacheScope(tenant=tenant, model_id="smollm2", model_version="v1"),
        chat=common_pb2.Conversation(messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be helpful."),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]),
        sampling=common_pb2.SamplingParams(**{"temperature": 0.0, **sampling}), max_tokens=64)


ENTRY = cache_pb2.CacheEntry(
    text="Paris.", token_ids=[1, 2], usage=common_pb2.Usage(prompt_tokens=9, completion_tokens=2),
    tier=common_pb2.TIER_SMALL, model_id="smollm2", finish_reason=common_pb2.FINISH_REASON_STOP,
    stop_reason="2", created_unix_ms=5.0)


@pytest.fixture
def served(config, embedder):
    def start(**overrides):
        server = CacheServer(dataclasses.replace(config, **overrides), embedder)
        port = server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel))
        return server, channel
    started: list = []
    yield start
    for server, channel in started:
        channel.close()
        server.stop(0)


def test_store_lookup_invalidate_stats_over_grpc(served):
    _, channel = served()
    stub = cache_pb2_grpc.CacheServiceStub(channel)
    miss = stub.Lookup(cache_pb2.LookupRequest(query=query("What is the capital of France?")))
    assert miss.result == common_pb2.CACHE_RESULT_MISS and not miss.HasField("entry")
    stored = stub.Store(cache_pb2.StoreRequest(query=query("What is the capital of France?"),
                                               entry=ENTRY))
    assert stored.stored and stored.entry_id and stored.reason == ""
    exact = stub.Lookup(cache_pb2.LookupRequest(query=query("What is the capital of France?")))
    assert exact.result == common_pb2.CACHE_RESULT_EXACT and exact.similarity == 1.0
    assert exact.entry.text == "Paris." and list(exact.entry.token_ids) == [1, 2]
    assert exact.entry.created_unix_ms > 1e12  # set by the cache, not the caller
    assert exact.entry.tier == common_pb2.TIER_SMALL and exact.entry.stop_reason == "2"
    sem = stub.Lookup(cache_pb2.LookupRequest(
        query=query("Which city is the capital of France?")))
    assert sem.result == common_pb2.CACHE_RESULT_SEMANTIC and 0.85 < sem.similarity < 1.0
    assert sem.entry_id == stored.entry_id
    no_sem = stub.Lookup(cache_pb2.LookupRequest(
        query=query("Which city is the capital of France?"),
        policy=common_pb2.CachePolicy(allow_semantic=False)))
    assert no_sem.result == common_pb2.CACHE_RESULT_MISS
    by_policy = stub.Lookup(cache_pb2.LookupRequest(
        query=query("What is the capital of France?"),
        policy=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)))
    assert by_policy.result == common_pb2.CACHE_RESULT_BYPASSED and by_policy.reason
    sampled = stub.Store(cache_pb2.StoreRequest(query=query("hi", temperature=0.5), entry=ENTRY))
    assert not sampled.stored and "allow_sampled" in sampled.reason

    removed = stub.Invalidate(cache_pb2.InvalidateRequest(entry_id=sem.entry_id))
    assert removed.removed == 1
    stats = stub.Stats(cache_pb2.StatsRequest(tenant="acme"))
    assert (stats.entries, stats.exact_hits, stats.semantic_hits, stats.misses) == (0, 1, 1, 2)
    assert (stats.stores, stats.dropped_stores, stats.redis_available) == (1, 1, True)


@pytest.mark.parametrize("call, request_", [
    ("Lookup", cache_pb2.LookupRequest()),
    ("Lookup", cache_pb2.LookupRequest(query=cache_pb2.CacheQuery(prompt="x"))),  # max_tokens 0
    ("Lookup", cache_pb2.LookupRequest(query=query("x"), policy=common_pb2.CachePolicy(
        min_similarity=2.0))),
    ("Store", cache_pb2.StoreRequest(query=query("x"))),
    ("Invalidate", cache_pb2.InvalidateRequest()),
    ("Invalidate", cache_pb2.InvalidateRequest(tenant="acme", tenant_filter="acme")),
])
def test_malformed_requests_are_invalid_argument(served, call, request_):
    _, channel = served()
    with pytest.raises(grpc.RpcError) as e:
        getattr(cache_pb2_grpc.CacheServiceStub(channel), call)(request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_fail_open_over_grpc_without_redis(served):
    _, channel = served(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    stub = cache_pb2_grpc.CacheServiceStub(channel)
    out = stub.Lookup(cache_pb2.LookupRequest(query=query("x")))
    assert out.result == common_pb2.CACHE_RESULT_UNAVAILABLE
    stored = stub.Store(cache_pb2.StoreRequest(query=query("x"), entry=ENTRY))
    assert not stored.stored and stored.reason == "store unavailable"
    with pytest.raises(grpc.RpcError) as e:
        stub.Invalidate(cache_pb2.InvalidateRequest(tenant="acme"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    stats = stub.Stats(cache_pb2.StatsRequest())
    assert not stats.redis_available and stats.redis_errors >= 1 and stats.dropped_stores == 1


def test_health_reflection_and_metrics_endpoint(served):
    metrics_port = free_port()
    _, channel = served(metrics_port=metrics_port)
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    cache_pb2_grpc.CacheServiceStub(channel).Lookup(cache_pb2.LookupRequest(query=query("x")))
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    assert 'switchyard_cache_lookups_total{kind="semantic",result="miss"} 1.0' in text
    assert "switchyard_cache_redis_up 1.0" in text
    assert "switchyard_cache_redis_errors_total" in text


def test_command_line_flags_and_environment():
    cfg = parse_args(["--redis-url", "redis://h:1/2", "--port", "0", "--ttl-s", "60",
                      "--refresh-ttl-on-hit", "true", "--default-mode", "lookup_only"],
                     {"SWITCHYARD_CACHE_SIMILARITY_THRESHOLD": "0.9",
                      "SWITCHYARD_CACHE_PORT": "1234"})
    assert (cfg.redis_url, cfg.port, cfg.ttl_s, cfg.refresh_ttl_on_hit) == (
        "redis://h:1/2", 0, 60.0, True)
    assert cfg.default_mode == CacheMode.LOOKUP_ONLY and cfg.similarity_threshold == 0.9
    for argv, env in ((["--similarity-threshold", "1.5"], {}),
                      ([], {"SWITCHYARD_CACHE_TTL_S": "soon"})):
        with pytest.raises(SystemExit):
            parse_args(argv, env)


def test_python_m_services_cache_serves_and_stops_on_sigterm(redis_server, tmp_path):
    port = free_port()
    env = {**os.environ, "SWITCHYARD_CACHE_KEY_PREFIX": "main-test:",
           "PYTHONPATH": os.pathsep.join(filter(None, ["protos", os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cache", "--redis-url", redis_server.url,
         "--port", str(port), "--redis-timeout-s", str(FUNCTIONAL_TIMEOUT_S)],
        cwd=Path(__file__).parents[2], env=env,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            assert stub.Store(cache_pb2.StoreRequest(query=query("ping?"), entry=ENTRY)).stored
            out = stub.Lookup(cache_pb2.LookupRequest(query=query("ping?")))
            assert out.result == common_pb2.CACHE_RESULT_EXACT
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 0, (tmp_path / "log").read_text()[-2000:]


def test_lookup_and_store_spans_join_the_callers_trace(served, tmp_path):
    import json

    from services.common.telemetry import Telemetry, TracingConfig, inject_metadata

    spans = tmp_path / "spans.jsonl"
    server, channel = served(trace_exporter="file", trace_file=spans)
    stub = cache_pb2_grpc.CacheServiceStub(channel)
    caller = Telemetry(TracingConfig(service_name="router", exporter="file", file_path=str(spans)))
    with caller.tracer.start_as_current_span("router.request") as root:
        md = inject_metadata()
        miss = stub.Lookup(cache_pb2.LookupRequest(query=query("Capital of France?")), metadata=md)
        stub.Store(cache_pb2.StoreRequest(query=query("Capital of France?"), entry=ENTRY),
                   metadata=md)
        hit = stub.Lookup(cache_pb2.LookupRequest(query=query("Capital of France?")), metadata=md)
    assert miss.result == common_pb2.CACHE_RESULT_MISS and hit.result == common_pb2.CACHE_RESULT_EXACT
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(cache_pb2.LookupRequest(), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    server.telemetry.provider.force_flush()
    caller.shutdown()
    got = [json.loads(line) for line in spans.read_text().splitlines()]
    cache_spans = [s for s in got if s["service"] == "cache"]
    assert [s["name"] for s in cache_spans] == ["cache.Lookup", "cache.Store", "cache.Lookup",
                                                "cache.Lookup"]
    root_id = f"{root.get_span_context().span_id:016x}"
    for s in cache_spans:
        assert s["parent_id"] == root_id and s["kind"] == "SERVER"
    for s in cache_spans[:3]:
        assert s["attributes"]["switchyard.tenant"] == "acme"
    assert cache_spans[3]["status"] == "ERROR"  # the malformed lookup
    first, _, second, _ = cache_spans
    assert first["attributes"]["switchyard.cache.result"] == "miss"
    assert "switchyard.cache.kind" not in first["attributes"]
    assert second["attributes"]["switchyard.cache.result"] == "exact"
    assert second["attributes"]["switchyard.cache.kind"] == "exact"
    assert second["attributes"]["switchyard.cache.similarity"] == pytest.approx(1.0)
    assert not any("France" in str(v) for s in cache_spans for v in s["attributes"].values())
