"""Hostile input on the router's gRPC API (RouterService) and its difficulty classifier.

Random and missing fields, NaN / infinite / subnormal / negative sampling values, integers at
their wire limits, unknown enum values and tiers, unknown fields, huge strings, invalid UTF-8
and corrupt wire bytes (sent to the worker and cache servers too), messages past the size
limit, hostile credentials, and prompt injection aimed at the classifier. Every call gets an
answer or a clear status (INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED,
UNAUTHENTICATED), never INTERNAL / UNKNOWN or a hang; a normal request succeeds after each
batch, and at the end the worker processes are alive with every KV block free. The workers and
the cache called directly: test_hostile_grpc_backends.py.
"""

from __future__ import annotations

import functools
import math
import time

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2

from services.router.domain import Tier
from tests.reliability import hostile, hostile_grpc
from tests.reliability.hostile import (
    INJECTIONS,
    LONG_REPEATS,
    SETTINGS,
    WEIRD,
    Tally,
    hostile_floats,
    pick,
    prompt_texts,
    small_ints,
    texts,
)
from tests.reliability.hostile_grpc import (
    CLEAR,
    DEADLINE_S,
    ENUMS,
    NO_CACHE,
    U32,
    U64,
    USER,
    assert_router_serving,
    complete,
    conversations,
    raw_call,
    sampling_params,
)
from tests.reliability.hostile_grpc import router_request as _req
from tests.reliability.hostile_grpc import sampling as _sp
from tests.router.conftest import KEYS
from tests.router.helpers import md, stub

TALLY = Tally()
pytestmark = hostile.BACKGROUND_RANDOM
outcome = functools.partial(hostile_grpc.outcome, TALLY)


# --- strategies -----------------------------------------------------------------------------------

_VALID = {"max_tokens": small_ints(), "tier_hint": st.sampled_from([0, 1, 2, 3]),
          "sampling": sampling_params(False), "prompt_version": st.text(max_size=8),
          "cache": st.just(NO_CACHE)}
_HOSTILE = {
    "max_tokens": st.sampled_from([0, 2**31, U32, 1025]), "tier_hint": ENUMS,
    "sampling": sampling_params(True), "prompt_version": texts(),
    "cache": st.builds(common_pb2.CachePolicy, mode=ENUMS, allow_sampled=st.booleans(),
                       allow_semantic=st.booleans(), min_similarity=hostile_floats()),
    "labels": st.dictionaries(texts(40), texts(300), max_size=40),
    "request_id": texts(300), "tenant": st.one_of(st.sampled_from(sorted(KEYS)), texts(300)),
    "add_generation_prompt": st.booleans(),
}


@st.composite
def router_requests(draw) -> router_pb2.GenerateRequest:
    """A valid request (with hostile text) with up to three fields made hostile, or an input
    that is missing or malformed."""
    names = draw(st.lists(st.sampled_from(sorted(_HOSTILE)), max_size=3, unique=True))
    fields = {n: draw(_HOSTILE[n] if n in names else _VALID[n]) for n in (*_VALID, *names)}
    kind = draw(st.sampled_from(["prompt", "chat", "hostile-chat", "none"]))
    if kind == "prompt":
        fields["prompt"] = draw(st.one_of(prompt_texts(), st.just("")))
    elif kind != "none":
        fields["chat"] = draw(conversations(kind == "hostile-chat"))
    return router_pb2.GenerateRequest(**fields)


def generate(router, req, tenant="acme"):
    msgs = list(stub(router).Generate(req, metadata=md(tenant), timeout=DEADLINE_S))
    kinds = [m.WhichOneof("kind") for m in msgs]
    assert kinds and kinds[-1] == "final" and set(kinds[:-1]) <= {"chunk"}, kinds
    return msgs[-1].final


# --- the router: tests ----------------------------------------------------------------------------

@settings(SETTINGS, max_examples=200)
@given(req=router_requests(), tenant=st.sampled_from(["acme", "acme", "smallonly", "limited"]),
       streaming=st.booleans())
def test_random_router_requests(grpc_router, req, tenant, streaming):
    call = (lambda: generate(grpc_router, req, tenant)) if streaming else (
        lambda: complete(grpc_router, req, tenant))
    code, result = outcome("grpc-router", call)
    if code == grpc.StatusCode.OK:
        route = result.route
        assert route.tier in (common_pb2.TIER_SMALL, common_pb2.TIER_LARGE), route
        if tenant == "smallonly":
            assert route.tier == common_pb2.TIER_SMALL, route


def test_router_serving_after_random_batch(grpc_router):
    assert_router_serving(grpc_router)


ROUTER_CASES = [
    (_req(prompt=""), "INVALID_ARGUMENT", "prompt"),
    (router_pb2.GenerateRequest(max_tokens=3), "INVALID_ARGUMENT", "input"),
    (_req(max_tokens=0), "INVALID_ARGUMENT", "max_tokens"),
    (_req(max_tokens=U32), "INVALID_ARGUMENT", "max_tokens"),
    (_req(sampling=_sp(temperature=math.nan)), "INVALID_ARGUMENT", "sampling.temperature"),
    (_req(sampling=_sp(temperature=math.inf)), "INVALID_ARGUMENT", "sampling.temperature"),
    (_req(sampling=_sp(temperature=-1.0)), "INVALID_ARGUMENT", "sampling.temperature"),
    (_req(sampling=_sp(temperature=1e39)), "INVALID_ARGUMENT", "sampling.temperature"),
    (_req(sampling=_sp(top_p=0.0)), "INVALID_ARGUMENT", "sampling.top_p"),
    (_req(sampling=_sp(top_p=-math.inf)), "INVALID_ARGUMENT", "sampling.top_p"),
    (_req(sampling=_sp(min_p=math.nan)), "INVALID_ARGUMENT", "sampling.min_p"),
    (_req(sampling=_sp(repetition_penalty=5e-324)), "INVALID_ARGUMENT",
     "sampling.repetition_penalty"),
    (_req(sampling=_sp(presence_penalty=-2.5)), "INVALID_ARGUMENT", "sampling.presence_penalty"),
    (_req(sampling=_sp(top_k=0)), "INVALID_ARGUMENT", "sampling.top_k"),
    (_req(sampling=_sp(logprobs=21)), "INVALID_ARGUMENT", "sampling.logprobs"),
    (_req(sampling=_sp(seed=U64)), "INVALID_ARGUMENT", "sampling.seed"),
    (_req(sampling=_sp(stop=[""])), "INVALID_ARGUMENT", "sampling.stop"),
    (_req(tier_hint=99), "INVALID_ARGUMENT", "tier_hint"),
    (_req(tier_hint=-1), "INVALID_ARGUMENT", "tier_hint"),
    (_req(cache=common_pb2.CachePolicy(mode=42)), "INVALID_ARGUMENT", "cache.mode"),
    (_req(cache=common_pb2.CachePolicy(min_similarity=math.nan)), "INVALID_ARGUMENT",
     "cache.min_similarity"),
    (_req(prompt=None, chat=common_pb2.Conversation()), "INVALID_ARGUMENT", "chat.messages"),
    (_req(prompt=None, chat=common_pb2.Conversation(messages=[common_pb2.ChatMessage(
        content="hi")])), "INVALID_ARGUMENT", "chat.messages[0].role"),
    (_req(prompt=None, chat=common_pb2.Conversation(messages=[common_pb2.ChatMessage(
        role=77, content="hi")])), "INVALID_ARGUMENT", "chat.messages[0].role"),
    (_req(prompt="x" * 200_001), "INVALID_ARGUMENT", "prompt"),
    (_req(labels={f"k{i}": "v" for i in range(40)}), "INVALID_ARGUMENT", "labels"),
    (_req(labels={"k": "v" * 1000}), "INVALID_ARGUMENT", "labels"),
    (_req(request_id="r" * 100_000), "INVALID_ARGUMENT", "request_id"),
    (_req(tenant="somebody-else"), "PERMISSION_DENIED", "tenant"),
    (_req(tenant="t" * 1_000_000), "INVALID_ARGUMENT", "tenant"),
    # Valid, if odd: the router must answer them.
    (_req(tier_hint=common_pb2.TIER_QUANTIZED), "OK", None),  # no live replica: falls back
    (_req(sampling=_sp(top_k=U32, temperature=1.0)), "OK", None),  # past the vocabulary
    (_req(sampling=_sp(stop_token_ids=[U32], seed=2**63 - 1, temperature=1.0)), "OK", None),
    (_req(sampling=_sp(temperature=1e-45, top_p=1e-6, min_p=1.0)), "OK", None),  # inf logits
    (_req(prompt=None, add_generation_prompt=False, chat=common_pb2.Conversation(messages=[
        common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content="\u200b")])), "OK",
     None),
    (_req(prompt="\u0000" * 100), "OK", None),
]


@pytest.mark.parametrize("req, code, field", ROUTER_CASES,
                         ids=[f"{i}-{c}-{f}" for i, (_, c, f) in enumerate(ROUTER_CASES)])
def test_router_fixed_cases(grpc_router, req, code, field):
    got, result = outcome("grpc-router", lambda: complete(grpc_router, req))
    assert got.name == code, (got, result)
    if field is not None:
        assert result.details().startswith(f"{field}: ") or field in result.details(), \
            result.details()


def test_router_limits_give_resource_exhausted_with_retry_after(grpc_router):
    code, err = outcome("grpc-router", lambda: complete(grpc_router, _req(max_tokens=U32),
                                                        tenant="limited"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(err.trailing_metadata())["retry-after"]) >= 1


def test_router_hostile_credentials(grpc_router):
    auth = CLEAR | {grpc.StatusCode.UNAUTHENTICATED}
    cases = [(), (("authorization", "Bearer"),), (("authorization", "Bearer "),),
             (("authorization", "Basic abc"),), (("authorization", "Bearer sk-nope-00000"),),
             (("x-api-key", ""),), (("x-api-key", "k" * 6000),),
             (("authorization", "Bearer " + "k" * 7000),),
             (("authorization", "Bearer sk-acme-0000000001"), ("x-api-key", "zzz"))]
    for metadata in cases:
        code, _ = outcome("grpc-router", lambda: stub(grpc_router).Complete(
            _req(), metadata=metadata, timeout=DEADLINE_S), auth)
        if metadata and metadata[0][1] == f"Bearer {KEYS['acme']}":
            assert code == grpc.StatusCode.OK
        else:
            assert code == grpc.StatusCode.UNAUTHENTICATED, metadata
    # Metadata past the server's header limit is refused by gRPC itself, not crashed on.
    code, _ = outcome("grpc-router", lambda: stub(grpc_router).Complete(
        _req(), metadata=(("authorization", "Bearer " + "k" * 20_000),), timeout=DEADLINE_S),
        auth)
    assert code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_router_oversized_message_is_resource_exhausted(grpc_router):
    code, _ = outcome("grpc-router", lambda: complete(grpc_router, _req(prompt="x" * 9_000_000)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_router_serving(grpc_router)


WIRE = [
    b"\x1a\x02\xff\xfe",  # prompt (field 3) with invalid UTF-8
    b"\x1a\x05ab\xed\xa0\x80",  # a UTF-8-encoded surrogate
    b"\xff\xff\xff\xff",  # not protobuf at all
    b"\x1a\x80\x80\x80\x80\x10",  # a length prefix past the message
]


def _wire_targets(router, worker, cache_channel) -> list[tuple[grpc.Channel, str]]:
    return [(router.channel, "/switchyard.router.v1.RouterService/Complete"),
            (worker.channel, "/switchyard.worker.v1.WorkerService/Generate"),
            (cache_channel, "/switchyard.cache.v1.CacheService/Lookup")]


def _wire_call(channel: grpc.Channel, method: str, payload: bytes):
    if method.endswith("Generate"):  # server-streaming
        return list(channel.unary_stream(method)(payload, timeout=DEADLINE_S))
    return raw_call(channel, method, payload, metadata=md())


def test_undecodable_requests_do_not_break_the_servers(grpc_router, cluster, cache_target):
    """Invalid UTF-8 and corrupt wire bytes: INVALID_ARGUMENT from every server (the decode
    guard, services/common/decode_guard.py: grpcio alone answers UNKNOWN or INTERNAL), and every
    server goes on serving."""
    worker = cluster["small"][0]
    with grpc.insecure_channel(cache_target) as cache_channel:
        for channel, method in _wire_targets(grpc_router, worker, cache_channel):
            for payload in WIRE:
                code, _ = outcome("grpc-wire", lambda: _wire_call(channel, method, payload),
                                  CLEAR)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, payload)
        assert_router_serving(grpc_router)
        assert worker.load().serving
        assert cache_pb2_grpc.CacheServiceStub(cache_channel).Stats(
            cache_pb2.StatsRequest(), timeout=DEADLINE_S).redis_available


def test_unknown_fields_are_ignored_by_the_router(grpc_router):
    payload = _req().SerializeToString() + b"\xf8\x06\x01" + b"\x92\x7d\x03abc"  # fields 111, 2002
    code, _ = outcome("grpc-router", lambda: raw_call(
        grpc_router.channel, "/switchyard.router.v1.RouterService/Complete", payload,
        metadata=md()))
    assert code == grpc.StatusCode.OK


# --- the classifier: prompt injection -------------------------------------------------------------

@settings(SETTINGS, max_examples=60)
@given(text=st.one_of(texts(2000), pick(INJECTIONS), st.builds(
    lambda a, b, n: (a + b) * n, pick(INJECTIONS), texts(50), st.integers(1, 30))))
def test_classifier_always_decides(classifier, text):
    TALLY.tried_one("classifier", "decided")
    decision = classifier.classify(text)
    assert isinstance(decision.tier, Tier)
    assert math.isfinite(decision.score) and 0.0 <= decision.score <= 1.0, decision


def test_classifier_is_linear_on_huge_repetitions(classifier):
    for text in LONG_REPEATS + ("[a" * 100_000, "\u201ca" * 100_000):
        TALLY.tried_one("classifier", "decided")
        start = time.monotonic()
        decision = classifier.classify(text)
        assert time.monotonic() - start < 10, f"{text[:4]!r}...: {time.monotonic() - start} s"
        assert isinstance(decision.tier, Tier) and 0.0 <= decision.score <= 1.0


@pytest.mark.parametrize("tenant, allowed", [("smallonly", {common_pb2.TIER_SMALL}),
                                             ("acme", {common_pb2.TIER_SMALL,
                                                       common_pb2.TIER_LARGE})])
def test_injection_never_routes_outside_the_tenants_tiers(grpc_router, tenant, allowed):
    for text in INJECTIONS + WEIRD:
        text = text[:240] or "hi"  # the tiny workers' context is 1024 tokens
        for req in (_req(prompt=text), _req(prompt=None, chat=common_pb2.Conversation(messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="tier=large"),
                common_pb2.ChatMessage(role=USER, content=text)]))):
            code, resp = outcome("grpc-router", lambda: complete(grpc_router, req, tenant))
            assert code == grpc.StatusCode.OK, resp
            assert resp.route.tier in allowed and resp.route.classified_tier in (
                common_pb2.TIER_SMALL, common_pb2.TIER_QUANTIZED, common_pb2.TIER_LARGE), \
                resp.route


def test_zz_cluster_survived(grpc_router, cluster):
    """Last in the module: the router still serves and no worker died or leaked KV blocks."""
    assert_router_serving(grpc_router)
    hostile.assert_workers_alive_and_idle(cluster)
    assert sum(TALLY.crashed.values()) == 0, TALLY.lines()
