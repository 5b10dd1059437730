"""Routing through a real router to real workers and the real cache, over loopback."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from switchyard.common.v1 import common_pb2

from tests.router.helpers import (
    EASY,
    HARD,
    MEDIUM,
    Load,
    complete,
    generate,
    md,
    request,
    rpc_error,
    stub,
)

SMALL, QUANTIZED, LARGE = common_pb2.TIER_SMALL, common_pb2.TIER_QUANTIZED, common_pb2.TIER_LARGE
NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)


def test_routes_by_difficulty_and_falls_back_past_a_dead_tier(router):
    easy = complete(router, request(EASY, cache=NO_CACHE))
    assert (easy.route.classified_tier, easy.route.tier) == (SMALL, SMALL)
    assert easy.route.difficulty_score < 0.24 and easy.route.decision_reason.startswith(
        "classifier: ")
    assert not easy.route.fallback and list(easy.route.attempted_tiers) == [SMALL]

    hard = complete(router, request(HARD, cache=NO_CACHE))
    assert (hard.route.classified_tier, hard.route.tier) == (LARGE, LARGE)
    assert hard.route.replica == "large-0" and hard.route.difficulty_score > 0.73

    # Medium goes to the quantized tier, whose only replica never answers: the router falls
    # back to the next tier up and says so.
    medium = complete(router, request(MEDIUM, cache=NO_CACHE))
    r = medium.route
    assert (r.classified_tier, r.tier, r.fallback) == (QUANTIZED, LARGE, True)
    assert list(r.attempted_tiers) == [QUANTIZED, LARGE] and r.retries == 1
    assert "fallback: no healthy quantized replica" in r.decision_reason
    assert medium.usage.completion_tokens == 4 and medium.text


def test_tier_hint_rules(router):
    hinted = complete(router, request(EASY, hint=LARGE, cache=NO_CACHE))
    assert (hinted.route.tier, hinted.route.decision_reason) == (LARGE, "hint")
    assert not hinted.route.HasField("difficulty_score")
    assert hinted.route.classified_tier == common_pb2.TIER_UNSPECIFIED

    # A tenant limited to the small tier may not ask for another one...
    err = rpc_error(complete, router, request(EASY, hint=LARGE), tenant="smallonly")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not use tier 'large'" in err.details()
    # ...and its classifier decisions are clamped to what it may use.
    clamped = complete(router, request(HARD, cache=NO_CACHE), tenant="smallonly")
    assert (clamped.route.classified_tier, clamped.route.tier) == (LARGE, SMALL)
    assert "large not allowed for tenant -> small" in clamped.route.decision_reason

    # A tenant whose hints are ignored gets the classifier's choice.
    ignored = complete(router, request(EASY, hint=LARGE, cache=NO_CACHE), tenant="nohint")
    assert (ignored.route.tier, ignored.route.classified_tier) == (SMALL, SMALL)
    assert ignored.route.decision_reason.startswith("hint ignored (tenant disallows)")

    # Thresholds are per tenant: "picky" sends everything to the large tier.
    picky = complete(router, request(EASY, cache=NO_CACHE), tenant="picky")
    assert (picky.route.classified_tier, picky.route.tier) == (LARGE, LARGE)
    assert picky.route.difficulty_score == pytest.approx(easy_score(router), abs=1e-6)


def easy_score(router) -> float:
    return router.server.classifier.score(EASY)


def _wait_for_hit(router, req, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        resp = complete(router, req)
        if resp.route.cache_result in (common_pb2.CACHE_RESULT_EXACT,
                                       common_pb2.CACHE_RESULT_SEMANTIC):
            return resp
        assert time.monotonic() < deadline, resp.route
        time.sleep(0.05)


def test_cache_miss_store_then_exact_and_semantic_hits(router):
    system = ("system", "You are a concise geography tutor.")
    first_req = request(chat=[system, ("user", "What is the capital of France?")],
                        max_tokens=6, hint=SMALL, prompt_version="geo@1")
    first = complete(router, first_req)
    assert first.route.cache_result == common_pb2.CACHE_RESULT_MISS and first.route.replica

    hit = _wait_for_hit(router, first_req)  # the store runs after the answer
    assert hit.route.cache_result == common_pb2.CACHE_RESULT_EXACT
    assert hit.route.cache_similarity == pytest.approx(1.0)
    assert (hit.text, hit.usage.completion_tokens, hit.finish_reason) == (
        first.text, first.usage.completion_tokens, first.finish_reason)
    assert hit.route.replica == "" and hit.route.tier == SMALL
    assert hit.route.decision_reason == "cache: exact hit"
    chunks, final = generate(router, first_req)  # a streamed hit is a single chunk
    assert len(chunks) == 1 and chunks[0].text == first.text
    assert final.route.cache_result == common_pb2.CACHE_RESULT_EXACT

    para = complete(router, request(chat=[system, ("user", "Which city is France's capital?")],
                                    max_tokens=6, hint=SMALL, prompt_version="geo@1"))
    assert para.route.cache_result == common_pb2.CACHE_RESULT_SEMANTIC, para.route
    assert 0.85 <= para.route.cache_similarity < 1.0 and para.text == first.text

    # Scope: another prompt_version, or a sampled request, never sees the entry.
    other = complete(router, request(chat=[system, ("user", "What is the capital of France?")],
                                     max_tokens=6, hint=SMALL, prompt_version="geo@2"))
    assert other.route.cache_result == common_pb2.CACHE_RESULT_MISS
    sampled = complete(router, request(chat=[system, ("user", "What is the capital of France?")],
                                       max_tokens=6, hint=SMALL, prompt_version="geo@1",
                                       temperature=0.8, cache=common_pb2.CachePolicy()))
    assert sampled.route.cache_result == common_pb2.CACHE_RESULT_BYPASSED
    disabled = complete(router, request(chat=[system, ("user", "What is the capital of France?")],
                                        max_tokens=6, hint=SMALL, prompt_version="geo@1",
                                        cache=NO_CACHE))
    assert disabled.route.cache_result == common_pb2.CACHE_RESULT_BYPASSED


def test_replica_choice_follows_live_load(router, cluster):
    busy, idle = cluster["small"]
    load = Load(busy, n=6)
    try:
        time.sleep(0.15)  # a WatchLoad snapshot (50 ms interval) shows the load
        served = [complete(router, request(f"hi {i}", hint=SMALL, cache=NO_CACHE)).route.replica
                  for i in range(8)]
    finally:
        load.stop()
    assert served.count(idle.worker_id) == 8, served


def test_prefix_affinity_reuses_the_cached_prefix_and_yields_when_overloaded(router, cluster):
    system = ("system", ("You are the support assistant of Northwind Outfitters. Answer in two "
                         "sentences, cite the order number when the customer gives one, and "
                         "never offer refunds above 50 dollars without a manager. Our store "
                         "hours are 9 to 6."))
    reqs = [request(chat=[system, ("user", f"Question number {i}: where is my order?")],
                    hint=SMALL, cache=NO_CACHE) for i in range(4)]
    answers = [complete(router, r) for r in reqs]
    replicas = {a.route.replica for a in answers}
    assert len(replicas) == 1, replicas
    assert all(a.usage.cached_prompt_tokens >= 48 for a in answers[1:]), [
        a.usage for a in answers]
    pinned = next(w for w in cluster["small"] if w.worker_id in replicas)
    other = next(w for w in cluster["small"] if w is not pinned)
    load = Load(pinned, n=8)
    try:
        time.sleep(0.15)
        moved = complete(router, reqs[0])
    finally:
        load.stop()
    assert moved.route.replica == other.worker_id


LONG = 1000
"""Tokens of a generation that cannot finish during the tests below: the tiny worker decodes
~190 tokens/s on this machine (one thread), so the request would run ~5 s."""


def test_deadline_propagates_and_the_worker_frees_its_blocks(router, cluster):
    worker = cluster["large"][0]
    start = time.monotonic()
    err = rpc_error(complete, router, request("tell me a story", hint=LARGE, max_tokens=LONG,
                                              ignore_eos=True, cache=NO_CACHE), timeout=0.5)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    worker.wait_idle(timeout=2.0)  # aborted on the worker, not run to the end
    assert time.monotonic() - start < 3.0


def test_client_cancel_aborts_the_worker_request(router, cluster):
    worker = cluster["large"][0]
    call = stub(router).Generate(request("tell me a story", hint=LARGE, max_tokens=LONG,
                                         ignore_eos=True, cache=NO_CACHE), metadata=md())
    assert next(call).WhichOneof("kind") == "chunk"
    assert worker.load().num_running == 1
    call.cancel()
    start = time.monotonic()
    worker.wait_idle(timeout=2.0)
    assert time.monotonic() - start < 2.0


def test_health_reflection_and_metrics(router):
    health = health_pb2_grpc.HealthStub(router.channel)
    for name in ("", "switchyard.router.v1.RouterService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(router.channel)
    resp = next(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"switchyard.router.v1.RouterService", "grpc.health.v1.Health"} <= names
    complete(router, request(EASY, cache=NO_CACHE))
    text = router.metrics()
    for name in ("switchyard_router_ttft_seconds_bucket", "switchyard_router_tpot_seconds_bucket",
                 "switchyard_router_e2e_seconds_bucket", "switchyard_router_goodput_requests_total",
                 "switchyard_router_slo_requests_total"):
        assert f'{name}{{' in text, name
    assert 'route="classifier",tier="small"' in text


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"] = \
                s.value
    return out


def test_metric_counts_match_the_requests_sent(router):
    """A known workload moves the counters and histogram totals by exactly its size."""
    before = _samples(router.metrics())
    n = 3
    finals = [complete(router, request(EASY, cache=NO_CACHE, hint=SMALL)) for _ in range(n)]
    after = _samples(router.metrics())

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("switchyard_router_requests_total{api=grpc,outcome=ok}") == n
    assert delta("switchyard_router_decisions_total{route=hint,tier=small}") == n
    for hist in ("ttft", "e2e"):
        assert delta(f"switchyard_router_{hist}_seconds_count{{route=hint,tier=small}}") == n
    assert delta("switchyard_router_slo_requests_total{route=hint,tier=small}") == n
    goodput = delta("switchyard_router_goodput_requests_total{route=hint,tier=small}")
    assert 0 <= goodput <= n
    ttft_sum = delta("switchyard_router_ttft_seconds_sum{route=hint,tier=small}")
    client_ttfts = [f.timings.ttft_ms / 1000 for f in finals]
    assert abs(ttft_sum - sum(client_ttfts)) < 1e-3 * n  # the same measurements, summed
