"""Fail-open: Redis killed, hung, or absent at start; the cache recovers without a restart."""

from __future__ import annotations

import dataclasses
import time

import pytest
import redis

from services.cache.config import CacheConfig
from services.cache.domain import Policy, ResultKind
from tests.cache.conftest import answer, chat, wait_for

DEFAULT = Policy()
Q = chat("What is the capital of France?")
PARA = chat("Which city is the capital of France?")
SERVED_TIMEOUT_S = CacheConfig().redis_timeout_s  # the bound these tests are about (50 ms)
BOUND_S = 0.3  # SERVED_TIMEOUT_S plus generous scheduling slack on a busy 2-core machine


@pytest.fixture
def private(config, redis_factory):
    """A private Redis (this test kills it) and a config pointing at it, with the served
    timeout (the shared `config` fixture loosens it for functional tests)."""
    server = redis_factory()
    return server, dataclasses.replace(config, redis_url=server.url,
                                       redis_timeout_s=SERVED_TIMEOUT_S)


def timed_lookup(cache, q):
    t0 = time.monotonic()
    out = cache.lookup(q, DEFAULT)
    return out, time.monotonic() - t0


def test_redis_killed_then_restarted(private, make_replica):
    server, config = private
    cache = make_replica(config).cache
    cache.store_answer(Q, answer("Paris."), DEFAULT)
    assert cache.lookup(Q, DEFAULT).kind == ResultKind.EXACT

    server.kill()
    for q in (Q, PARA, Q, PARA):  # the first pays the failure, later ones hit the breaker
        out, took = timed_lookup(cache, q)
        assert out.kind == ResultKind.UNAVAILABLE and out.answer is None, out
        assert took < BOUND_S, took
    dropped = cache.store_answer(chat("new question"), answer(), DEFAULT)
    assert not dropped.stored and dropped.reason == "store unavailable"
    assert wait_for(lambda: not cache.stats("").redis_available)
    stats = cache.stats("")
    assert stats.dropped_stores == 1 and stats.redis_errors >= 1 and stats.entries == 0
    assert cache.metrics.dropped_stores.labels("unavailable")._value.get() == 1

    server.start()  # same port, empty (no persistence)
    assert wait_for(lambda: cache.lookup(Q, DEFAULT).kind == ResultKind.MISS, timeout=5.0)
    assert wait_for(lambda: len(cache.index) == 0, timeout=2.0)  # reconciled: Redis is empty
    assert cache.store_answer(Q, answer("Paris again."), DEFAULT).stored
    assert cache.lookup(Q, DEFAULT).kind == ResultKind.EXACT
    hit = cache.lookup(PARA, DEFAULT)
    assert hit.kind == ResultKind.SEMANTIC and hit.answer.text == "Paris again."
    assert cache.stats("").redis_available


def test_redis_hung_lookup_is_bounded(private, make_replica):
    server, config = private
    cache = make_replica(config).cache
    cache.store_answer(Q, answer(), DEFAULT)
    server.pause()
    try:
        for q in (Q, PARA):
            out, took = timed_lookup(cache, q)
            assert out.kind == ResultKind.UNAVAILABLE and took < BOUND_S, (out, took)
        assert not cache.store_answer(chat("another"), answer(), DEFAULT).stored
    finally:
        server.resume()
    assert wait_for(lambda: cache.lookup(Q, DEFAULT).kind == ResultKind.EXACT, timeout=5.0)
    assert cache.lookup(PARA, DEFAULT).kind == ResultKind.SEMANTIC


def test_redis_down_at_start(private, make_replica):
    server, config = private
    server.kill()
    cache = make_replica(config).cache
    assert cache.lookup(Q, DEFAULT).kind == ResultKind.UNAVAILABLE
    server.start()
    assert wait_for(lambda: cache.lookup(Q, DEFAULT).kind == ResultKind.MISS, timeout=5.0)
    assert cache.store_answer(Q, answer(), DEFAULT).stored
    assert cache.lookup(PARA, DEFAULT).kind == ResultKind.SEMANTIC


def test_redis_out_of_memory_refuses_stores_but_serves_hits(private, make_replica):
    server, config = private
    cache = make_replica(config).cache
    cache.store_answer(Q, answer("Paris."), DEFAULT)
    admin = redis.Redis.from_url(server.url)
    admin.config_set("maxmemory", 1)  # noeviction: every write is refused with OOM
    try:
        out = cache.store_answer(chat("new question"), answer(), DEFAULT)
        assert not out.stored and out.reason == "store unavailable"
        assert cache.lookup(Q, DEFAULT).kind == ResultKind.EXACT  # no back-off: Redis is up
        assert cache.lookup(PARA, DEFAULT).kind == ResultKind.SEMANTIC
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    assert cache.store_answer(chat("new question"), answer(), DEFAULT).stored
