"""Overload: offered load far past capacity, over loopback with a real worker process.

Capacity of the worker here is max_num_seqs (2 running) + max_waiting (2 queued). Waves of 24
concurrent long requests must: keep the worker's queue within its bound, refuse the excess
early with RESOURCE_EXHAUSTED (gRPC trailing metadata `retry-after`) or HTTP 429 with
Retry-After, finish every admitted request in full, and leave nothing behind (KV blocks,
router in-flight count, router tasks, worker memory).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from switchyard.common.v1 import common_pb2

from tests.router.conftest import Worker, router_config
from tests.router.helpers import complete, request

NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)
MAX_SEQS, MAX_WAITING = 2, 2
OFFERED = 24
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def narrow(tiny_models, tmp_path_factory):
    """One small-tier worker with room for 2 running + 2 waiting requests."""
    w = Worker(str(tiny_models[0]), "narrow", "small", tmp=tmp_path_factory.mktemp("narrow"),
               extra_args=("--max-num-seqs", str(MAX_SEQS), "--max-waiting", str(MAX_WAITING)))
    w.wait_serving()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def narrow_router(narrow, make_router):
    return make_router(router_config({"small": [narrow.address]}))


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class LoadSampler:
    """Polls the worker's GetLoad while a wave runs; keeps the largest queue seen."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.max_waiting_seen = self.max_running_seen = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            load = self.worker.load()
            self.max_waiting_seen = max(self.max_waiting_seen, load.num_waiting)
            self.max_running_seen = max(self.max_running_seen, load.num_running)
            self.samples += 1
            time.sleep(0.01)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def _router_tasks(running) -> int:
    """Tasks on the routers' event loop, counted on that loop."""
    async def count() -> int:
        return len(asyncio.all_tasks())
    return running.loop.run(count())


def _one(router, i: int) -> tuple[str, float, object]:
    """(outcome, seconds, detail): "ok" with the response or "refused" with the retry hint."""
    req = request(f"overload request {i}: tell me a long story", max_tokens=MAX_TOKENS,
                  ignore_eos=True, hint=common_pb2.TIER_SMALL, cache=NO_CACHE)
    t0 = time.monotonic()
    try:
        resp = complete(router, req, timeout=120)
        return "ok", time.monotonic() - t0, resp
    except grpc.RpcError as exc:
        elapsed = time.monotonic() - t0
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return f"error {exc.code().name}: {exc.details()}", elapsed, None
        retry = dict(exc.trailing_metadata() or ()).get("retry-after")
        return "refused", elapsed, (retry, exc.details())


def _wave(router, worker: Worker) -> tuple[list, LoadSampler]:
    with LoadSampler(worker) as sampler, ThreadPoolExecutor(OFFERED) as pool:
        results = list(pool.map(lambda i: _one(router, i), range(OFFERED)))
    return results, sampler


def test_overload_is_refused_early_and_admitted_requests_finish(narrow_router, narrow):
    router = narrow_router.server.router
    tasks_before = _router_tasks(narrow_router)
    rss = []
    for wave in range(3):
        results, sampler = _wave(narrow_router, narrow)
        outcomes = [r[0] for r in results]
        assert set(outcomes) <= {"ok", "refused"}, outcomes
        ok = [r for r in results if r[0] == "ok"]
        refused = [r for r in results if r[0] == "refused"]
        # Admitted requests finish in full; at least the worker's capacity was admitted.
        assert len(ok) >= MAX_SEQS and all(
            r[2].usage.completion_tokens == MAX_TOKENS for r in ok), len(ok)
        assert len(refused) >= OFFERED // 2, f"wave {wave}: only {len(refused)} refused"
        # Refused early, with a hint: well before an admitted request could have finished.
        for _, seconds, (retry, details) in refused:
            assert retry is not None and int(retry) >= 1, details
            assert "full" in details or "max_in_flight" in details, details
            assert seconds < min(r[1] for r in ok) + 1.0, (seconds, details)
        # The worker's queue never grew past its bound.
        assert sampler.samples > 5
        assert sampler.max_waiting_seen <= MAX_WAITING and sampler.max_running_seen <= MAX_SEQS
        load = narrow.wait_idle()
        assert load.kv_blocks_free == load.kv_blocks_total
        assert router.in_flight == 0
        rss.append(_rss_kb(narrow.proc.pid))
    # No growth across waves beyond allocator noise (each wave offers the same load), and the
    # router's event loop holds no more tasks than before.
    assert rss[-1] - rss[0] < 32 * 1024, rss
    assert _router_tasks(narrow_router) <= tasks_before
    rejected = narrow_router.metrics()
    assert 'switchyard_router_rejections_total{reason="capacity"}' in rejected


def test_overload_on_the_http_api_is_429_with_retry_after(narrow_router, narrow):
    import json
    import urllib.error
    import urllib.request

    from tests.router.conftest import KEYS

    def post(i: int):
        body = json.dumps({"model": "small", "prompt": f"story {i}", "max_tokens": MAX_TOKENS,
                           "ignore_eos": True, "temperature": 0,
                           "cache": {"mode": "disabled"}}).encode()
        req = urllib.request.Request(
            f"{narrow_router.base_url}/completions", body, method="POST",
            headers={"Authorization": f"Bearer {KEYS['acme']}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())

    with ThreadPoolExecutor(OFFERED) as pool:
        results = list(pool.map(post, range(OFFERED)))
    statuses = sorted({r[0] for r in results})
    assert statuses == [200, 429], statuses
    for status, headers, body in results:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            assert body["error"]["code"] == "overloaded", body
        else:
            assert body["usage"]["completion_tokens"] == MAX_TOKENS
    narrow.wait_idle()


def test_router_max_in_flight_bounds_what_it_holds(narrow, make_router):
    """The router's own bound refuses before any worker is asked."""
    limit = 3
    capped = make_router(router_config({"small": [narrow.address]}, max_in_flight=limit))
    router = capped.server.router
    peak = 0
    stop = threading.Event()

    def watch():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, router.in_flight)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(OFFERED) as pool:
            results = list(pool.map(lambda i: _one(capped, i), range(OFFERED)))
    finally:
        stop.set()
        watcher.join(5)
    assert peak <= limit
    details = [r[2][1] for r in results if r[0] == "refused"]
    assert any("max_in_flight=3" in d for d in details), details
    assert all(r[0] in ("ok", "refused") for r in results)
    assert router.in_flight == 0
    assert 'switchyard_router_rejections_total{reason="max_in_flight"}' in capped.metrics()
    narrow.wait_idle()
