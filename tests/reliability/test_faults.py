"""Faults injected into a running cluster, over loopback with real processes:

- a worker SIGKILLed mid-stream: requests before their first token move to another replica,
  streams already under way end with UNAVAILABLE at once (not at their deadline), the router
  ejects the replica and takes it back when it returns;
- a worker frozen (SIGSTOP): its WatchLoad stream goes stale, so the router marks it not
  ready within `load_stale_after_s`; requests waiting for its first token move away; streams
  on it end with UNAVAILABLE once keepalive pings go unanswered; SIGCONT brings it back;
- Redis killed and restarted, and the cache service stopped and restarted: the router keeps
  serving uncached and says so (cache_result UNAVAILABLE), then caches again;
- the router restarted: the same client channel reconnects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from switchyard.common.v1 import common_pb2

from services.router.server import RouterServer
from tests.cache.conftest import RedisServer
from tests.reliability.parts import embedder
from tests.router.conftest import KEYS, LoopThread, Worker, free_port, router_config
from tests.router.helpers import complete, md, request, stub
from tests.router.test_failures import _pinned_system_prompt, _wait

NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)
STALE_S = 1.0
KEEPALIVE_S = 1.0
HEALTH = {"probe_interval_s": 0.1, "max_probe_interval_s": 0.5, "probe_timeout_s": 0.5,
          "load_stale_after_s": STALE_S, "keepalive_time_s": KEEPALIVE_S,
          "keepalive_timeout_s": KEEPALIVE_S}
DEADLINE_S = 60.0
"""Every request's deadline: the bounds asserted below are far under it, so a client that
waited for its deadline would fail them."""


@pytest.fixture(scope="module")
def pair(tiny_models, tmp_path_factory) -> Iterator[list[Worker]]:
    """Two small-tier workers this module kills, freezes and restarts."""
    tmp = tmp_path_factory.mktemp("fault-workers")
    workers = [Worker(str(tiny_models[0]), f"fault-{i}", "small", tmp=tmp) for i in range(2)]
    for w in workers:
        w.wait_serving()
    yield workers
    for w in workers:
        if w.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.proc.pid, signal.SIGCONT)
        w.stop()


@pytest.fixture(scope="module")
def fault_router(pair, make_router):
    return make_router(router_config({"small": [w.address for w in pair]}, health=HEALTH))


def _replica(router, worker: Worker):
    return next(r for r in router.server.pool.all() if r.address == worker.address)


def _stream(router, req, started: threading.Event, out: dict) -> None:
    """Reads a Generate stream on a thread; records chunks, the error and when it ended."""
    out["chunks"] = 0
    try:
        for msg in stub(router).Generate(req, metadata=md(), timeout=DEADLINE_S):
            if msg.WhichOneof("kind") == "chunk":
                out["chunks"] += 1
                if out["chunks"] == 3:
                    started.set()
        out["error"] = None
    except grpc.RpcError as exc:
        out["error"] = exc
    finally:
        out["ended"] = time.monotonic()
        started.set()


def _start_stream(router, system: str) -> tuple[threading.Thread, dict]:
    """A long greedy stream pinned by its system prompt, once 3 chunks have arrived."""
    req = request(chat=[("system", system), ("user", f"count {uuid.uuid4().hex}")],
                  max_tokens=900, ignore_eos=True, hint=common_pb2.TIER_SMALL, cache=NO_CACHE)
    started, out = threading.Event(), {}
    t = threading.Thread(target=_stream, args=(router, req, started, out), daemon=True)
    t.start()
    assert started.wait(30) and out["chunks"] >= 3, out
    return t, out


def _complete_async(router, req, pool: ThreadPoolExecutor):
    return pool.submit(complete, router, req, timeout=DEADLINE_S)


def test_worker_killed_mid_stream(fault_router, pair):
    victim, survivor = pair
    system = _pinned_system_prompt(fault_router, victim.address)
    pinned = request(chat=[("system", system), ("user", "hello")], hint=common_pb2.TIER_SMALL,
                     cache=NO_CACHE)
    assert complete(fault_router, pinned).route.replica == victim.worker_id

    # One stream under way on the victim; then freeze it so the next request is accepted but
    # gets no first token; then kill it.
    thread, streaming = _start_stream(fault_router, system)
    os.kill(victim.proc.pid, signal.SIGSTOP)
    with ThreadPoolExecutor(1) as pool:
        waiting = _complete_async(fault_router, pinned, pool)
        time.sleep(0.3)
        killed_at = time.monotonic()
        victim.kill()
        resp = waiting.result(DEADLINE_S)
    thread.join(DEADLINE_S)

    # Before its first token: retried on the survivor.
    assert resp.route.replica == survivor.worker_id and resp.route.retries == 1
    assert resp.usage.completion_tokens == 4
    # Mid-stream: UNAVAILABLE at once, not at the 60 s deadline.
    err = streaming["error"]
    assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, streaming
    assert streaming["ended"] - killed_at < 5.0
    dead = _replica(fault_router, victim)
    assert dead.ejected and not dead.available
    assert 'switchyard_router_replica_available{replica="%s",tier="small"} 0.0' % \
        victim.address in fault_router.metrics()

    # While it is down its traffic goes to the survivor without retries; restarted on the same
    # port, a health probe brings it back.
    again = complete(fault_router, pinned)
    assert (again.route.replica, again.route.retries) == (survivor.worker_id, 0)
    victim.start()
    victim.wait_serving()
    _wait(lambda: dead.available, timeout=15)
    assert complete(fault_router, pinned).route.replica == victim.worker_id
    survivor.wait_idle()
    victim.wait_idle()


def test_frozen_worker_is_marked_not_ready_and_traffic_moves(fault_router, pair):
    frozen, other = pair
    replica = _replica(fault_router, frozen)
    _wait(lambda: replica.available, timeout=15)
    system = _pinned_system_prompt(fault_router, frozen.address)
    pinned = request(chat=[("system", system), ("user", "hi there")], hint=common_pb2.TIER_SMALL,
                     cache=NO_CACHE)
    thread, streaming = _start_stream(fault_router, system)

    os.kill(frozen.proc.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        # Sent before the router notices: it waits for a first token that never comes, until
        # the stale load stream ejects the replica; then it moves to the other one.
        resp = complete(fault_router, pinned, timeout=DEADLINE_S)
        assert resp.route.replica == other.worker_id and resp.route.retries == 1
        ejected_after = time.monotonic() - frozen_at
        assert not replica.available
        assert ejected_after < STALE_S + 3.0, ejected_after
        # The stream under way ends with UNAVAILABLE when keepalive gives up on the transport.
        thread.join(DEADLINE_S)
        err = streaming["error"]
        assert err is not None and err.code() == grpc.StatusCode.UNAVAILABLE, streaming
        assert streaming["ended"] - frozen_at < 2 * KEEPALIVE_S + STALE_S + 5.0
        # While frozen, new traffic goes straight to the other replica.
        again = complete(fault_router, pinned)
        assert (again.route.replica, again.route.retries) == (other.worker_id, 0)
    finally:
        os.kill(frozen.proc.pid, signal.SIGCONT)
    # Thawed: probed back in; the request it was running was cancelled with its transport,
    # so it holds no KV blocks.
    _wait(lambda: replica.available, timeout=15)
    assert complete(fault_router, pinned).route.replica == frozen.worker_id
    frozen.wait_idle()
    other.wait_idle()


# --- the cache and Redis ---------------------------------------------------------------------


class CacheStack:
    """A private Redis and the cache service on fixed ports, each stoppable and restartable."""

    def __init__(self, tmp):
        self.embedder = embedder()
        self.redis = RedisServer(tmp)
        self.redis.start()
        self.port = free_port()
        self.server = None
        self.start_cache()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_cache(self) -> None:
        from services.cache.config import CacheConfig
        from services.cache.server import CacheServer

        config = CacheConfig(redis_url=self.redis.url, key_prefix=f"f{uuid.uuid4().hex[:6]}:",
                             port=self.port, grpc_workers=4, probe_interval_s=0.1,
                             sweep_interval_s=0.5, redis_timeout_s=0.2)
        self.server = CacheServer(config, self.embedder)
        self.server.start()

    def stop_cache(self) -> None:
        self.server.stop(0.2)
        self.server = None

    def close(self) -> None:
        if self.server is not None:
            self.stop_cache()
        self.redis.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[CacheStack]:
    s = CacheStack(tmp_path_factory.mktemp("fault-redis"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def cached_router(stack, pair, make_router):
    return make_router(router_config({"small": [w.address for w in pair]},
                                     cache_target=stack.target, health=HEALTH))


def _ask(router, text: str):
    return complete(router, request(text, hint=common_pb2.TIER_SMALL))


def _wait_cached(router, text: str, timeout: float = 20.0) -> None:
    """Asks until the answer comes from the cache (stores are written after the answer)."""
    deadline = time.monotonic() + timeout
    while _ask(router, text).route.cache_result != common_pb2.CACHE_RESULT_EXACT:
        assert time.monotonic() < deadline, "the cache did not come back"
        time.sleep(0.1)


def test_redis_killed_and_restarted(cached_router, stack):
    text = f"What is the tallest mountain? {uuid.uuid4().hex}"
    _wait_cached(cached_router, text)

    stack.redis.kill()
    down = [_ask(cached_router, text) for _ in range(3)]
    for resp in down:  # served by a worker, and the route says the cache was not there
        assert resp.route.cache_result == common_pb2.CACHE_RESULT_UNAVAILABLE
        assert resp.route.replica and resp.usage.completion_tokens == 4

    stack.redis.start()  # same port, empty (no persistence): answers are cached again
    _wait_cached(cached_router, text)


def test_cache_service_stopped_and_restarted(cached_router, stack):
    text = f"Name a prime number. {uuid.uuid4().hex}"
    _wait_cached(cached_router, text)

    stack.stop_cache()
    try:
        for _ in range(3):
            t0 = time.monotonic()
            resp = _ask(cached_router, text)
            assert resp.route.cache_result == common_pb2.CACHE_RESULT_UNAVAILABLE
            assert resp.route.replica and resp.usage.completion_tokens == 4
            assert time.monotonic() - t0 < 5.0
        # The HTTP API says so too, in its `switchyard` extension.
        chat = cached_router.openai().chat.completions.create(
            model="small", messages=[{"role": "user", "content": text}], max_tokens=4,
            temperature=0)
        assert chat.model_extra["switchyard"]["cache_result"] == "unavailable"
    finally:
        stack.start_cache()
    _wait_cached(cached_router, text)


# --- the router ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Client:
    """What tests.router.helpers calls a router: something with a channel."""

    channel: grpc.Channel


def test_router_restarted_clients_reconnect(pair, classifier):
    config = router_config({"small": [w.address for w in pair]}, grpc_port=free_port(),
                           http_port=free_port(), health=HEALTH)
    loop = LoopThread("restarted-router")
    channel = grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}")

    def start() -> RouterServer:
        server = RouterServer(config, classifier=classifier)
        loop.run(server.start(), 30)
        assert loop.run(server.wait_ready(30), 40)
        return server

    client = _Client(channel)
    req = request("hello again", hint=common_pb2.TIER_SMALL, cache=NO_CACHE)
    server = start()
    try:
        assert complete(client, req).usage.completion_tokens == 4
        loop.run(server.stop(0.5), 10)
        with pytest.raises(grpc.RpcError) as down:
            complete(client, req, timeout=2)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        server = start()
        # The same channel reconnects on its own (wait_for_ready rides out its backoff).
        resp = stub(client).Complete(req, metadata=md(), timeout=30, wait_for_ready=True)
        assert resp.usage.completion_tokens == 4
        import openai

        api = openai.OpenAI(base_url=f"http://127.0.0.1:{config.http_port}/v1",
                            api_key=KEYS["acme"], max_retries=0, timeout=30)
        assert api.completions.create(model="small", prompt="hi", max_tokens=2).usage
    finally:
        channel.close()
        with contextlib.suppress(Exception):
            loop.run(server.stop(0.5), 10)
        loop.stop()
