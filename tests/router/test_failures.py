"""Worker failures: retry before the first token, ejection and probing back, no replica left."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from switchyard.common.v1 import common_pb2

from services.router.domain import Tier
from tests.router.conftest import Worker, free_port, router_config
from tests.router.helpers import complete, request, rpc_error

NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)


@pytest.fixture(scope="module")
def victim(tiny_models, tmp_path_factory):
    w = Worker(str(tiny_models[0]), "victim", "small", tmp=tmp_path_factory.mktemp("victim"))
    w.wait_serving()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def pair_router(victim, cluster, make_router):
    """Small tier = [victim, small-0]; no cache, so every request reaches a worker."""
    return make_router(router_config({"small": [victim.address, cluster["small"][0].address]}))


def _pinned_system_prompt(router, address: str) -> str:
    """A system prompt whose affinity replica is `address`."""
    balancer = router.server.router.dispatcher.balancer
    for i in range(200):
        text = f"You are assistant #{i} of the Contoso help desk; be brief and polite."
        choice = balancer.pick(Tier.SMALL, text, set())
        if choice.reason == "affinity" and choice.replica.address == address:
            return text
    raise AssertionError("no prompt maps to the replica")


def _wait(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_worker_dying_before_first_token_is_retried_elsewhere(pair_router, victim, cluster):
    system = _pinned_system_prompt(pair_router, victim.address)
    req = request(chat=[("system", system), ("user", "hello")], hint=common_pb2.TIER_SMALL,
                  cache=NO_CACHE)
    assert complete(pair_router, req).route.replica == "victim"  # affinity holds

    # Freeze the victim (it accepts the call but sends nothing), send a request pinned to it,
    # then kill it: the call fails before any output and must be retried on small-0.
    os.kill(victim.proc.pid, signal.SIGSTOP)
    future = pair_router.channel.unary_unary(
        "/switchyard.router.v1.RouterService/Complete",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b).future(
            req, metadata=(("authorization", "Bearer sk-acme-0000000001"),), timeout=30)
    time.sleep(0.5)
    victim.kill()
    from switchyard.router.v1 import router_pb2

    resp = router_pb2.CompleteResponse.FromString(future.result())
    assert resp.route.replica == "small-0"
    assert resp.route.retries == 1 and not resp.route.fallback
    assert resp.usage.completion_tokens == 4
    pool = pair_router.server.pool
    dead = next(r for r in pool.all() if r.address == victim.address)
    assert dead.ejected
    # While it is out, its affinity traffic goes to the survivor without retries.
    again = complete(pair_router, req)
    assert (again.route.replica, again.route.retries) == ("small-0", 0)

    # Restarted on the same port, a health probe brings it back and affinity returns to it.
    victim.start()
    victim.wait_serving()
    _wait(lambda: dead.available)
    assert complete(pair_router, req).route.replica == "victim"
    ejections = f'switchyard_router_replica_ejections_total{{replica="{victim.address}"'
    assert ejections in pair_router.metrics().replace(',tier="small"', "")


def test_no_healthy_replica_anywhere_is_unavailable(make_router):
    router = make_router(router_config({"small": [f"127.0.0.1:{free_port()}"],
                                        "large": [f"127.0.0.1:{free_port()}"]}))
    err = rpc_error(complete, router, request("hi", cache=NO_CACHE))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy replica could serve the request (tiers tried: small, large" in \
        err.details()
