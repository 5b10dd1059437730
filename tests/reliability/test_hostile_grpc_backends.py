"""Hostile input on the gRPC APIs behind the router: the workers' WorkerService (called
directly, as a compromised or buggy router could) and the cache's CacheService.

Random and missing fields, hostile sampling values, integers at their wire limits, unknown enum
values and fields, huge strings and ids, reused request ids, and cache entries a reader could
not read. Every call gets an answer or a clear status (INVALID_ARGUMENT for bad values), never
INTERNAL / UNKNOWN or a hang; at the end the worker processes are alive with every KV block free
and the cache still serves. The router's own API: test_hostile_grpc_router.py.
"""

from __future__ import annotations

import functools
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

from tests.reliability import hostile, hostile_grpc
from tests.reliability.hostile import (
    SETTINGS,
    Tally,
    hostile_floats,
    prompt_texts,
    small_ints,
    texts,
)
from tests.reliability.hostile_grpc import (
    DEADLINE_S,
    ENUMS,
    U32,
    U32S,
    assert_router_serving,
    complete,
    conversations,
    sampling_params,
)
from tests.reliability.hostile_grpc import sampling as _sp

TALLY = Tally()
pytestmark = hostile.BACKGROUND_RANDOM
outcome = functools.partial(hostile_grpc.outcome, TALLY)


# --- the worker, called directly ------------------------------------------------------------------

def worker_generate(worker, req):
    msgs = list(worker.stub.Generate(req, timeout=DEADLINE_S))
    kinds = [m.WhichOneof("kind") for m in msgs]
    assert kinds and kinds[-1] == "complete" and set(kinds[:-1]) <= {"chunk"}, kinds
    return msgs[-1].complete


_W_VALID = {"max_tokens": small_ints(), "sampling": sampling_params(False),
            "labels": st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)}
_W_HOSTILE = {"max_tokens": st.sampled_from([0, 1025, 2**31, U32]),
              "sampling": sampling_params(True),
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
        fields["chat"] = draw(conversations(kind == "hostile-chat"))
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
    fields = {"scope": draw(_scope()), "max_tokens": draw(U32S),
              "sampling": draw(sampling_params(draw(st.booleans())))}
    kind = draw(st.sampled_from(["prompt", "chat", "none"]))
    if kind == "prompt":
        fields["prompt"] = draw(texts(300))
    elif kind == "chat":
        fields["chat"] = draw(conversations(True))
    return cache_pb2.CacheQuery(**fields)


_POLICY = st.builds(common_pb2.CachePolicy, mode=ENUMS, allow_sampled=st.booleans(),
                    allow_semantic=st.booleans(), min_similarity=hostile_floats())
_ENTRY = st.builds(cache_pb2.CacheEntry, text=texts(300), token_ids=st.lists(U32S, max_size=20),
                   usage=st.builds(common_pb2.Usage, prompt_tokens=U32S, completion_tokens=U32S),
                   tier=ENUMS, model_id=texts(30), finish_reason=ENUMS,
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
