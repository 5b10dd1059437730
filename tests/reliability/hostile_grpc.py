"""Shared by the hostile gRPC tests (test_hostile_grpc_router.py, test_hostile_grpc_backends.py):
what a hostile call may get back, how one is run and counted, strategies for the messages both
sides take, and the router they call."""

from __future__ import annotations

import grpc
from hypothesis import strategies as st
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2

from tests.reliability.hostile import Tally, hostile_floats, prompt_texts, small_ints, texts
from tests.router.conftest import KEYS, router_config
from tests.router.helpers import md, stub

DEADLINE_S = 60.0
"""Client deadline of every call: one that runs out is a hang, not an answer."""
CLEAR = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}
"""What a hostile request may get from the router or a worker (auth cases add
UNAUTHENTICATED)."""
CRASHES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
U32, U64 = 2**32 - 1, 2**64 - 1
NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)
USER = common_pb2.ROLE_USER


def outcome(tally: Tally, api: str, fn, allowed=CLEAR, crashes=CRASHES):
    """Runs one call; returns (code, result or error). Counts it in `tally`; a crash code or a
    status outside `allowed` fails the test."""
    try:
        result, code = fn(), grpc.StatusCode.OK
    except grpc.RpcError as exc:
        result, code = exc, exc.code()
    tally.tried_one(api, code.name)
    if code in crashes:
        tally.crash(api)
    assert code in allowed, f"{code.name}: {result.details() if code.value[0] else result}"
    if code != grpc.StatusCode.OK:
        details = result.details() or ""
        assert details and len(details) < 16_384, details[:300]
    return code, result


def raw_call(channel: grpc.Channel, method: str, payload: bytes, **kw):
    """Sends bytes as they are: what a client without protobuf, or a hostile one, sends."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return call(payload, timeout=DEADLINE_S, **kw)


def start_router(cluster, make_router, cache_target):
    """A router over the shared cluster with three tenants: `acme` (every tier), `smallonly`
    (the small tier only) and `limited` (600 tokens a minute)."""
    tenants = {name: {"api_keys": [KEYS[name]], "permission_scope": "hostile-grpc", **extra}
               for name, extra in {"acme": {}, "smallonly": {"allowed_tiers": ["small"]},
                                   "limited": {"tokens_per_minute": 600}}.items()}
    return make_router(router_config(
        {"small": [w.address for w in cluster["small"]], "quantized": [cluster["quantized_dead"]],
         "large": [w.address for w in cluster["large"]]},
        cache_target=cache_target, tenants=tenants))


def router_request(**kw) -> router_pb2.GenerateRequest:
    """A small valid router request, cache off; keywords override."""
    kw.setdefault("prompt", "Once upon a time")
    kw.setdefault("max_tokens", 3)
    kw.setdefault("cache", NO_CACHE)
    return router_pb2.GenerateRequest(**kw)


def sampling(**kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kw)


def complete(router, request, tenant="acme", **kw):
    return stub(router).Complete(request, metadata=md(tenant), timeout=DEADLINE_S, **kw)


def assert_router_serving(router) -> None:
    request = router_pb2.GenerateRequest(prompt="What's the capital of Italy?", max_tokens=3,
                                         sampling=common_pb2.SamplingParams(temperature=0.0))
    resp = complete(router, request)
    assert resp.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)


# --- strategies -----------------------------------------------------------------------------------

U32S = st.one_of(st.sampled_from([0, 1, 2**31, U32]), st.integers(0, U32))
ENUMS = st.one_of(st.integers(0, 4), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]))


def sampling_params(hostile_values: bool) -> st.SearchStrategy[common_pb2.SamplingParams]:
    if hostile_values:
        floats, ints = hostile_floats(), U32S
        seed = st.one_of(st.integers(0, U64), st.sampled_from([2**63 - 1, 2**63, U64]))
        stop = st.lists(texts(12), max_size=3)
    else:
        floats, ints, seed = st.floats(0.1, 1.0), small_ints(1, 5), st.integers(0, 2**63 - 1)
        stop = st.lists(st.text(min_size=1, max_size=8), max_size=2)
    optional = {name: floats for name in ("temperature", "top_p", "min_p",
                                          "repetition_penalty", "presence_penalty",
                                          "frequency_penalty")}
    return st.fixed_dictionaries({"stop": stop, "stop_token_ids": st.lists(U32S, max_size=3),
                                  "ignore_eos": st.booleans()},
                                 optional={**optional, "top_k": ints, "seed": seed,
                                           "logprobs": ints}).map(
        lambda kw: common_pb2.SamplingParams(**kw))


def conversations(hostile_values: bool) -> st.SearchStrategy[common_pb2.Conversation]:
    role = ENUMS if hostile_values else st.integers(1, 4)
    message = st.builds(common_pb2.ChatMessage, role=role, content=prompt_texts(),
                        name=texts(20))
    return st.builds(common_pb2.Conversation,
                     messages=st.lists(message, min_size=0 if hostile_values else 1,
                                       max_size=3))
