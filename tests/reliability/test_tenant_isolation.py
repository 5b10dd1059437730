"""Tenants are isolated from each other, through a real router, cache and worker process:

- an answer cached for tenant A is never served to tenant B for the identical request, nor for
  a paraphrase (semantic), even with the same permission scope; B's own cache still works;
- A exhausting its limits (max_concurrent, tokens_per_minute) leaves B's budget and requests
  untouched, including a B with the very same limits;
- A cannot act as B: a tenant claim that differs from the key's tenant is refused over gRPC,
  a claim without a key is refused (the router does not trust the field), and over HTTP a
  claim in the body is ignored (the scope stays the key's tenant).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from switchyard.common.v1 import common_pb2

from tests.router.conftest import KEYS, Worker, router_config
from tests.router.helpers import EASY, request, rpc_error, stub

SMALL = common_pb2.TIER_SMALL
RIVAL_KEY, STEADY_KEY = "sk-rival-00000001", "sk-steady-0000001"
TENANTS = {
    # acme and rival share a permission scope: only the tenant tells their entries apart.
    "acme": {"api_keys": [KEYS["acme"]], "permission_scope": "team"},
    "rival": {"api_keys": [RIVAL_KEY], "permission_scope": "team"},
    "limited": {"api_keys": [KEYS["limited"]], "max_concurrent": 1, "tokens_per_minute": 600},
    "steady": {"api_keys": [STEADY_KEY], "max_concurrent": 1, "tokens_per_minute": 600},
}
KEY = {"acme": KEYS["acme"], "rival": RIVAL_KEY, "limited": KEYS["limited"],
       "steady": STEADY_KEY}
NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)
HIT = (common_pb2.CACHE_RESULT_EXACT, common_pb2.CACHE_RESULT_SEMANTIC)


@pytest.fixture(scope="module")
def worker(tiny_models, tmp_path_factory) -> Iterator[Worker]:
    w = Worker(str(tiny_models[0]), "iso-0", "small", tmp=tmp_path_factory.mktemp("iso"))
    w.wait_serving()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def router(worker, cache_target, make_router):
    """A router of its own (fresh limits), on the session's cache service."""
    return make_router(router_config({"small": [worker.address]}, cache_target=cache_target,
                                     tenants=TENANTS))


@pytest.fixture
def version() -> str:
    """A prompt_version of this test alone: the session's cache holds other tests' entries."""
    return f"iso-{uuid.uuid4().hex[:8]}"


def md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEY[tenant]}"),)


def ask(router, tenant: str, text: str, version: str, **kw):
    req = request(chat=[("user", text)], max_tokens=6, hint=SMALL, prompt_version=version, **kw)
    return stub(router).Complete(req, metadata=md(tenant), timeout=60)


def wait_for_hit(router, tenant: str, text: str, version: str):
    deadline = time.monotonic() + 10
    while True:  # the store runs after the answer
        resp = ask(router, tenant, text, version)
        if resp.route.cache_result in HIT:
            return resp
        assert time.monotonic() < deadline, resp.route
        time.sleep(0.05)


def test_exact_answers_are_not_shared_across_tenants(router, version):
    first = ask(router, "acme", "What is the capital of France?", version)
    assert first.route.cache_result == common_pb2.CACHE_RESULT_MISS
    assert wait_for_hit(router, "acme", "What is the capital of France?",
                        version).route.cache_result == common_pb2.CACHE_RESULT_EXACT
    other = ask(router, "rival", "What is the capital of France?", version)
    assert other.route.cache_result == common_pb2.CACHE_RESULT_MISS, other.route
    assert other.route.replica == "iso-0"  # generated, not served from acme's entry
    # rival's own answer is cached for rival: the miss above was the scope, not a broken cache.
    assert wait_for_hit(router, "rival", "What is the capital of France?",
                        version).route.cache_result == common_pb2.CACHE_RESULT_EXACT


def test_semantic_answers_are_not_shared_across_tenants(router, version):
    ask(router, "acme", "What is the capital of France?", version)
    wait_for_hit(router, "acme", "What is the capital of France?", version)
    para = ask(router, "acme", "Which city is France's capital?", version)
    assert para.route.cache_result == common_pb2.CACHE_RESULT_SEMANTIC, para.route  # same tenant
    other = ask(router, "rival", "Which city is France's capital?", version)
    assert other.route.cache_result == common_pb2.CACHE_RESULT_MISS, other.route
    assert other.route.cache_similarity == 0.0  # nothing of acme's was even a candidate


def _hold(router, tenant: str):
    """A long generation that keeps one of `tenant`'s concurrency slots busy."""
    call = stub(router).Generate(request("tell me a story", hint=SMALL, max_tokens=500,
                                         ignore_eos=True, cache=NO_CACHE), metadata=md(tenant))
    assert next(call).WhichOneof("kind") == "chunk"
    return call


def test_one_tenant_hitting_its_limits_leaves_others_untouched(router):
    """limited and steady have the same limits; only limited spends them."""
    limits = router.server.router.limits
    hold = _hold(router, "limited")
    try:
        err = rpc_error(stub(router).Complete, request(EASY, cache=NO_CACHE),
                        metadata=md("limited"), timeout=30)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'limited' has 1 requests in flight" in err.details()
        # limited is at its concurrency limit: steady (the same limit) and acme are not.
        for tenant in ("steady", "acme"):
            resp = stub(router).Complete(request(EASY, hint=SMALL, cache=NO_CACHE),
                                         metadata=md(tenant), timeout=60)
            assert resp.usage.completion_tokens > 0, tenant
        assert limits.in_flight("limited") == 1
    finally:
        hold.cancel()
    deadline = time.monotonic() + 5
    while limits.in_flight("limited"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # The cancelled request keeps its ~505-token reservation: limited's minute is spent, so
    # this request is refused for limited, and passes, the very same, for steady and acme.
    big = request(EASY, hint=SMALL, max_tokens=200, cache=NO_CACHE)
    err = rpc_error(stub(router).Complete, big, metadata=md("limited"), timeout=30)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'limited' is over its limit tokens_per_minute=600" in err.details()
    for tenant in ("steady", "acme"):
        assert stub(router).Complete(big, metadata=md(tenant), timeout=60).route.replica, tenant
    assert [limits.in_flight(t) for t in TENANTS] == [0, 0, 0, 0]


def test_a_tenant_cannot_claim_another_tenants_field(router, version):
    s = stub(router)
    err = rpc_error(s.Complete, request(EASY, tenant="rival"), metadata=md("acme"), timeout=30)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "belongs to tenant 'acme', not 'rival'" in err.details()
    # Claiming an unlimited tenant does not escape limits either.
    err = rpc_error(s.Complete, request(EASY, tenant="acme"), metadata=md("limited"), timeout=30)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # Without a key, the field is not trusted (trust_tenant_field is off by default).
    err = rpc_error(s.Complete, request(EASY, tenant="rival"), timeout=30)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED

    # Over HTTP a claim in the body is ignored: acme asking rival's cached question as "rival"
    # still misses, while rival itself hits.
    text = "Name the largest planet in the solar system."
    ask(router, "rival", text, version)
    wait_for_hit(router, "rival", text, version)

    def http(key_of: str, **claims) -> str:
        import openai

        client = openai.OpenAI(base_url=router.base_url, api_key=KEY[key_of], max_retries=0,
                               timeout=60)
        resp = client.chat.completions.create(
            model="small", max_tokens=6, temperature=0.0,
            messages=[{"role": "user", "content": text}],
            extra_body={"prompt_version": version, **claims})
        return resp.model_extra["switchyard"]["cache_result"]

    assert http("rival") == "exact"  # the same body hits for its owner ...
    assert http("acme", tenant="rival", user="rival") == "miss"  # ... and not for a claimant
