"""Hostile input on the gRPC APIs: the router's RouterService, the workers' WorkerService
(called directly, as a compromised or buggy router could) and the cache's CacheService.

Random and missing fields, NaN / infinite / subnormal / negative sampling values, integers at
their wire limits, unknown enum values and tiers, unknown fields, huge strings, invalid UTF-8
and corrupt wire bytes, messages past the size limit, hostile credentials, reused request ids,
and prompt injection aimed at the difficulty classifier. Every call gets an answer or a clear
status (INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAUTHENTICATED), never
INTERNAL / UNKNOWN or a hang; a normal request succeeds after each batch, and at the end the
worker processes are alive with every KV block free.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2
from switchyard.worker.v1 import worker_pb2

from services.router.domain import Tier
from tests.reliability import hostile
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
from tests.router.conftest import KEYS, router_config
from tests.router.helpers import md, stub

TALLY = Tally()
pytestmark = hostile.BACKGROUND_RANDOM
DEADLINE_S = 60.0
"""Client deadline of every call: one that runs out is a hang, not an answer."""
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
"""What a hostile request may get from the router or a worker (auth cases add
UNAUTHENTICATED)."""
CRASHES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
U32, U64 = 2**32 - 1, 2**64 - 1
NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)


@pytest.fixture(scope="module", autouse=True)
def _tally(request):
    yield
    hostile.report(request, TALLY)


@pytest.fixture(scope="module")
def grpc_router(cluster, make_router, cache_target):
    tenants = {name: {"api_keys": [KEYS[name]], "permission_scope": "hostile-grpc", **extra}
               for name, extra in {"acme": {}, "smallonly": {"allowed_tiers": ["small"]},
                                   "limited": {"tokens_per_minute": 600}}.items()}
    return make_router(router_config(
        {"small": [w.address for w in cluster["small"]], "quantized": [cluster["quantized_dead"]],
         "large": [w.address for w in cluster["large"]]},
        cache_target=cache_target, tenants=tenants))


def outcome(api: str, fn, allowed=CLEAR, crashes=CRASHES):
    """Runs one call; returns (code, result or error). Counts it; a crash code or a status
    outside `allowed` fails the test."""
    try:
        result, code = fn(), grpc.StatusCode.OK
    except grpc.RpcError as exc:
        result, code = exc, exc.code()
    TALLY.tried_one(api, code.name)
    if code in crashes:
        TALLY.crash(api)
    assert code in allowed, f"{code.name}: {result.details() if code.value[0] else result}"
    if code != grpc.StatusCode.OK:
        details = result.details() or ""
        assert details and len(details) < 16_384, details[:300]
    return code, result


def raw_call(channel: grpc.Channel, method: str, payload: bytes, **kw):
    """Sends bytes as they are: what a client without protobuf, or a hostile one, sends."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return call(payload, timeout=DEADLINE_S, **kw)


# --- the router: strategies -----------------------------------------------------------------------

_U32 = st.one_of(st.sampled_from([0, 1, 2**31, U32]), st.integers(0, U32))
_ENUM = st.one_of(st.integers(0, 4), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]))


def _sampling(hostile_values: bool) -> st.SearchStrategy[common_pb2.SamplingParams]:
    if hostile_values:
        floats, ints = hostile_floats(), _U32
        seed = st.one_of(st.integers(0, U64), st.sampled_from([2**63 - 1, 2**63, U64]))
        stop = st.lists(texts(12), max_size=3)
    else:
        floats, ints, seed = st.floats(0.1, 1.0), small_ints(1, 5), st.integers(0, 2**63 - 1)
        stop = st.lists(st.text(min_size=1, max_size=8), max_size=2)
    optional = {name: floats for name in ("temperature", "top_p", "min_p",
                                          "repetition_penalty", "presence_penalty",
                                          "frequency_penalty")}
    return st.fixed_dictionaries({"stop": stop, "stop_token_ids": st.lists(_U32, max_size=3),
                                  "ignore_eos": st.booleans()},
                                 optional={**optional, "top_k": ints, "seed": seed,
                                           "logprobs": ints}).map(
        lambda kw: common_pb2.SamplingParams(**kw))


def _conversation(hostile_values: bool) -> st.SearchStrategy[common_pb2.Conversation]:
    role = _ENUM if hostile_values else st.integers(1, 4)
    message = st.builds(common_pb2.ChatMessage, role=role, content=prompt_texts(),
                        name=texts(20))
    return st.builds(common_pb2.Conversation,
                     messages=st.lists(message, min_size=0 if hostile_values else 1,
                                       max_size=3))


_VALID = {"max_tokens": small_ints(), "tier_hint": st.sampled_from([0, 1, 2, 3]),
          "sampling": _sampling(False), "prompt_version": st.text(max_size=8),
          "cache": st.just(NO_CACHE)}
_HOSTILE = {
    "max_tokens": st.sampled_from([0, 2**31, U32, 1025]), "tier_hint": _ENUM,
    "sampling": _sampling(True), "prompt_version": texts(),
    "cache": st.builds(common_pb2.CachePolicy, mode=_ENUM, allow_sampled=st.booleans(),
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
        fields["chat"] = draw(_conversation(kind == "hostile-chat"))
    return router_pb2.GenerateRequest(**fields)


def complete(router, req, tenant="acme", **kw):
    return stub(router).Complete(req, metadata=md(tenant), timeout=DEADLINE_S, **kw)


def generate(router, req, tenant="acme"):
    msgs = list(stub(router).Generate(req, metadata=md(tenant), timeout=DEADLINE_S))
    kinds = [m.WhichOneof("kind") for m in msgs]
    assert kinds and kinds[-1] == "final" and set(kinds[:-1]) <= {"chunk"}, kinds
    return msgs[-1].final


def assert_router_serving(router) -> None:
    req = router_pb2.GenerateRequest(prompt="What's the capital of Italy?", max_tokens=3,
                                     sampling=common_pb2.SamplingParams(temperature=0.0))
    resp = complete(router, req)
    assert resp.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)


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


def _req(**kw) -> router_pb2.GenerateRequest:
    kw.setdefault("prompt", "Once upon a time")
    kw.setdefault("max_tokens", 3)
    kw.setdefault("cache", NO_CACHE)
    return router_pb2.GenerateRequest(**kw)


def _sp(**kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kw)


USER = common_pb2.ROLE_USER
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


# --- the worker, called directly ------------------------------------------------------------------

def worker_generate(worker, req):
    msgs = list(worker.stub.Generate(req, timeout=DEADLINE_S))
    kinds = [m.WhichOneof("kind") for m in msgs]
    assert kinds and kinds[-1] == "complete" and set(kinds[:-1]) <= {"chunk"}, kinds
    return msgs[-1].complete


_W_VALID = {"max_tokens": small_ints(), "sampling": _sampling(False),
            "labels": st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)}
_W_HOSTILE = {"max_tokens": st.sampled_from([0, 1025, 2**31, U32]), "sampling": _sampling(True),
              "labels": st.dictionaries(texts(40), texts(300), max_size=40),
              "request_id": st.sampled_from(["", "\u0000", "r" * 100_000]),
              "add_generation_prompt": st.booleans()}


@st.composite
def worker_requests(draw) -> worker_pb2.GenerateRequest:
    """Like router_requests: a valid request with up to two fields made hostile, or a missing
    or malformed input. Ids are unique unless a hostile one is drawn."""
    names = draw(st.lists(st.sampled_from(sorted(_W_HOSTILE)), max_size=2, unique=True))
    fields = {n: draw(_W_HOSTILE[n] if n in names else _W_VALID[n])
              for n in (*_W_VALID, *names)}
    fields.setdefault("request_id", f"hostile-{uuid.uuid4().hex}")
    kind = draw(st.sampled_from(["prompt", "chat", "hostile-chat", "none"]))
    if kind == "prompt":
        fields["prompt"] = draw(st.one_of(prompt_texts(), st.just("")))
    elif kind != "none":
        fields["chat"] = draw(_conversation(kind == "hostile-chat"))
    return worker_pb2.GenerateRequest(**fields)


@settings(SETTINGS, max_examples=120)
@given(req=worker_requests())
def test_random_worker_requests(cluster, req):
    worker = cluster["small"][0]
    code, result = outcome("grpc-worker", lambda: worker_generate(worker, req))
    if code == grpc.StatusCode.OK:
        assert 1 <= result.usage.completion_tokens <= req.max_tokens


def test_worker_refuses_a_reused_request_id_without_harming_the_first(cluster):
    worker = cluster["large"][0]
    rid = f"dup-{uuid.uuid4().hex}"
    first = worker_pb2.GenerateRequest(request_id=rid, prompt="lorem ipsum " * 8, max_tokens=400,
                                       sampling=_sp(temperature=0.0, ignore_eos=True))
    out: dict = {}

    def run_first() -> None:
        try:
            out["complete"] = worker_generate(worker, first)
        except grpc.RpcError as exc:
            out["error"] = exc
    t = threading.Thread(target=run_first)
    t.start()
    deadline = time.monotonic() + 20
    while worker.load().num_running == 0:
        assert time.monotonic() < deadline, "the first request did not start"
        time.sleep(0.01)
    code, err = outcome("grpc-worker", lambda: worker_generate(worker, worker_pb2.GenerateRequest(
        request_id=rid, prompt="hi", max_tokens=2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.details()
    t.join(DEADLINE_S)
    assert not t.is_alive(), "the first request hangs"
    assert "error" not in out, out.get("error")
    assert out["complete"].usage.completion_tokens == 400
    # Once it has finished the id is free again.
    code, _ = outcome("grpc-worker", lambda: worker_generate(worker, worker_pb2.GenerateRequest(
        request_id=rid, prompt="hi", max_tokens=2)))
    assert code == grpc.StatusCode.OK


def test_worker_other_rpcs_with_hostile_values(cluster):
    worker = cluster["small"][0]
    for rid in ("", "nope", "\u0000" * 1000, "x" * 1_000_000):
        code, resp = outcome("grpc-worker", lambda: worker.stub.Abort(
            worker_pb2.AbortRequest(request_id=rid), timeout=DEADLINE_S))
        assert code == grpc.StatusCode.OK and not resp.found
    for interval in (0, 1, U32):
        def first_load(interval=interval):
            call = worker.stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=interval),
                                         timeout=DEADLINE_S)
            try:
                return next(call)
            finally:
                call.cancel()
        code, load = outcome("grpc-worker", first_load)
        assert code == grpc.StatusCode.OK and load.serving
    unknown = worker_pb2.GenerateRequest(request_id="u1", prompt="hi", max_tokens=2)
    payload = unknown.SerializeToString() + b"\xf8\x06\x01"  # field 111: a newer client's
    code, err = outcome("grpc-worker", lambda: list(worker.channel.unary_stream(
        "/switchyard.worker.v1.WorkerService/Generate")(payload, timeout=DEADLINE_S)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown field" in err.details()


def test_worker_huge_prompt_is_refused_quickly(cluster):
    worker = cluster["small"][0]
    start = time.monotonic()
    code, err = outcome("grpc-worker", lambda: worker_generate(worker, worker_pb2.GenerateRequest(
        request_id=f"huge-{uuid.uuid4().hex}", prompt="hello world " * 350_000, max_tokens=2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("max_tokens")
    assert time.monotonic() - start < 30
    assert worker.load().serving


# --- the cache service ----------------------------------------------------------------------------

def _scope() -> st.SearchStrategy[cache_pb2.CacheScope]:
    # Tenants of their own, so nothing here touches other tests' entries.
    return st.builds(cache_pb2.CacheScope, tenant=texts(30).map(lambda s: "hostile-" + s),
                     permission_scope=texts(30), model_id=texts(30), model_version=texts(30),
                     prompt_version=texts(30))


@st.composite
def cache_queries(draw) -> cache_pb2.CacheQuery:
    fields = {"scope": draw(_scope()), "max_tokens": draw(_U32),
              "sampling": draw(_sampling(draw(st.booleans())))}
    kind = draw(st.sampled_from(["prompt", "chat", "none"]))
    if kind == "prompt":
        fields["prompt"] = draw(texts(300))
    elif kind == "chat":
        fields["chat"] = draw(_conversation(True))
    return cache_pb2.CacheQuery(**fields)


_POLICY = st.builds(common_pb2.CachePolicy, mode=_ENUM, allow_sampled=st.booleans(),
                    allow_semantic=st.booleans(), min_similarity=hostile_floats())
_ENTRY = st.builds(cache_pb2.CacheEntry, text=texts(300), token_ids=st.lists(_U32, max_size=20),
                   usage=st.builds(common_pb2.Usage, prompt_tokens=_U32, completion_tokens=_U32),
                   tier=_ENUM, model_id=texts(30), finish_reason=_ENUM,
                   created_unix_ms=hostile_floats(), stop_reason=texts(30))
CACHE_CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@settings(SETTINGS, max_examples=120)
@given(query=st.one_of(st.none(), cache_queries()), policy=st.one_of(st.none(), _POLICY),
       entry=st.one_of(st.none(), _ENTRY), op=st.sampled_from(["lookup", "store"]))
def test_random_cache_requests(cache_stub, query, policy, entry, op):
    fields = {k: v for k, v in (("query", query), ("policy", policy)) if v is not None}
    if op == "store" and entry is not None:
        fields["entry"] = entry

    def call():
        if op == "lookup":
            return cache_stub.Lookup(cache_pb2.LookupRequest(**fields), timeout=DEADLINE_S)
        return cache_stub.Store(cache_pb2.StoreRequest(**fields), timeout=DEADLINE_S)
    outcome("grpc-cache", call, CACHE_CLEAR)


@settings(SETTINGS, max_examples=40)
@given(target=st.sampled_from(["tenant", "model_version", "prompt_version", "entry_id", None]),
       value=texts(60), tenant_filter=st.one_of(st.just(""), texts(30).map(
           lambda s: "hostile-" + s)))
def test_random_cache_invalidations(cache_stub, target, value, tenant_filter):
    if target in ("model_version", "prompt_version") and not tenant_filter:
        tenant_filter = "hostile-none"  # never wipe a version across the session's tenants
    fields = {"tenant_filter": tenant_filter}
    if target is not None:
        fields[target] = "hostile-" + value if target == "tenant" else value
    outcome("grpc-cache", lambda: cache_stub.Invalidate(cache_pb2.InvalidateRequest(**fields),
                                                        timeout=DEADLINE_S), CACHE_CLEAR)
    outcome("grpc-cache", lambda: cache_stub.Stats(cache_pb2.StatsRequest(tenant=value),
                                                   timeout=DEADLINE_S), CACHE_CLEAR)


@pytest.fixture(scope="module")
def cache_stub(cache_target):
    with grpc.insecure_channel(cache_target) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)


def test_cache_refuses_entries_its_readers_cannot_read(grpc_router, cache_stub):
    """A direct cache client storing an entry with an unknown tier must not poison the answer
    the router later reads for that exact request."""
    from services.router.convert import cache_query
    from services.router.domain import GenerateRequest, Sampling

    prompt = f"poison {uuid.uuid4().hex}"
    routed = GenerateRequest(request_id="x", tenant="acme", permission_scope="hostile-grpc",
                             max_tokens=3, prompt=prompt, sampling=Sampling(temperature=0.0))
    query = cache_query(routed, "auto", grpc_router.server.config.cache.model_version)
    for tier in (99, -1, 2**31 - 1):
        entry = cache_pb2.CacheEntry(text="poisoned", token_ids=[1], tier=tier,
                                     finish_reason=common_pb2.FINISH_REASON_STOP,
                                     usage=common_pb2.Usage(completion_tokens=1))
        code, err = outcome("grpc-cache", lambda: cache_stub.Store(cache_pb2.StoreRequest(
            query=query, entry=entry), timeout=DEADLINE_S), CACHE_CLEAR)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "entry.tier" in err.details()
    code, resp = outcome("grpc-router", lambda: complete(grpc_router, router_pb2.GenerateRequest(
        prompt=prompt, max_tokens=3, sampling=_sp(temperature=0.0))))
    assert code == grpc.StatusCode.OK and resp.text != "poisoned"


def test_cache_still_serves(cache_stub):
    q = cache_pb2.CacheQuery(scope=cache_pb2.CacheScope(tenant="hostile-check"),
                             prompt="ping", max_tokens=4,
                             sampling=common_pb2.SamplingParams(temperature=0.0))
    resp = cache_stub.Lookup(cache_pb2.LookupRequest(query=q), timeout=DEADLINE_S)
    assert resp.result in (common_pb2.CACHE_RESULT_MISS, common_pb2.CACHE_RESULT_EXACT)
    assert cache_stub.Stats(cache_pb2.StatsRequest(), timeout=DEADLINE_S).redis_available


def test_zz_cluster_survived(grpc_router, cluster):
    """Last in the module: the router still serves and no worker died or leaked KV blocks."""
    assert_router_serving(grpc_router)
    hostile.assert_workers_alive_and_idle(cluster)
    assert sum(TALLY.crashed.values()) == 0, TALLY.lines()
