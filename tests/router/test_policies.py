"""Authentication, per-tenant limits and the cascade policy, through both front doors."""

from __future__ import annotations

import time

import grpc
import openai
import pytest
from switchyard.common.v1 import common_pb2

from tests.router.conftest import router_config
from tests.router.helpers import EASY, complete, generate, md, request, rpc_error, stub

NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)
SMALL, LARGE = common_pb2.TIER_SMALL, common_pb2.TIER_LARGE


def test_authentication(router):
    s = stub(router)
    err = rpc_error(s.Complete, request(EASY))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in err.details()
    bad = (("authorization", "Bearer sk-nope-12345"),)
    err = rpc_error(s.Complete, request(EASY), metadata=bad)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and err.details() == "invalid API key"
    err = rpc_error(s.Complete, request(EASY, tenant="limited"), metadata=md("acme"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to tenant 'acme'" in err.details()
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=router.base_url, api_key="sk-wrong-000000", max_retries=0
                      ).models.list()
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"


def test_concurrency_and_token_limits(router):
    """Tenant "limited": max_concurrent=1, tokens_per_minute=600."""
    hold = stub(router).Generate(request("tell me a story", hint=LARGE, max_tokens=500,
                                         ignore_eos=True, cache=NO_CACHE),
                                 metadata=md("limited"))
    assert next(hold).WhichOneof("kind") == "chunk"
    err = rpc_error(complete, router, request(EASY, cache=NO_CACHE), tenant="limited")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit max_concurrent=1" in err.details()
    assert dict(err.trailing_metadata())["retry-after"] == "1"
    client = router.openai("limited")
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="auto", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 429 and "max_concurrent" in info.value.message
    assert info.value.response.headers["retry-after"] == "1"
    hold.cancel()
    limits = router.server.router.limits
    deadline = time.monotonic() + 5
    while limits.in_flight("limited"):
        assert time.monotonic() < deadline
        time.sleep(0.02)

    # The cancelled request keeps its ~505-token reservation: 600/min is nearly spent.
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="small", prompt="hello", max_tokens=200)
    assert "tokens_per_minute=600" in info.value.message
    assert int(info.value.response.headers["retry-after"]) >= 5
    err = rpc_error(complete, router, request(EASY, max_tokens=1000), tenant="limited")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "lower max_tokens" in err.details()
    assert 'switchyard_router_rejections_total{reason="tokens_per_minute"}' in router.metrics()


def test_cascade_escalates_low_confidence_answers(router):
    # The tiny random "small" model is unsure of every token (mean logprob ~ -10.8).
    resp = complete(router, request(EASY, cache=NO_CACHE), tenant="cascade")
    r = resp.route
    assert (r.classified_tier, r.tier) == (SMALL, LARGE)
    assert list(r.attempted_tiers) == [SMALL, LARGE] and not r.fallback
    assert "cascade: escalated from small (mean logprob" in r.decision_reason
    assert not resp.logprobs  # the client did not ask for them
    # Streaming requests are never cascaded.
    _, final = generate(router, request(EASY, cache=NO_CACHE), tenant="cascade")
    assert final.route.tier == SMALL and "cascade" not in final.route.decision_reason
    assert "switchyard_router_cascade_escalations_total 1.0" in router.metrics()


def test_cascade_keeps_confident_answers(cluster, make_router):
    r = make_router(router_config({"small": [w.address for w in cluster["small"]],
                                   "large": [w.address for w in cluster["large"]]},
                                  cascade={"min_mean_logprob": -100.0}))
    resp = complete(r, request(EASY, cache=NO_CACHE), tenant="cascade")
    assert resp.route.tier == SMALL and list(resp.route.attempted_tiers) == [SMALL]
    assert "cascade: kept small answer" in resp.route.decision_reason
