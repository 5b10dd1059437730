"""Cancellation storm: thousands of requests cancelled at seeded random points, everywhere a
request can be cancelled, mixed with requests that complete; afterwards every worker is idle
with every KV block free, and the workers' wasted-compute counters match the workload.

Where requests are cancelled (each kind also sends requests that run to completion):

  router_grpc    RouterService.Generate, the client cancels its stream
  http           the router's OpenAI API (streamed /v1/completions), the client disconnects
  worker_grpc    WorkerService.Generate straight to a worker, the client cancels its stream
  worker_abort   WorkerService.Generate, then the Abort RPC; the stream stays open to its end

and when: `before` the first token (after a random delay, nothing read), `mid`-stream (after
1-8 tokens of a 900-token budget), at the `end` (after the last token arrived, before the final
message was read), or never (`complete`).

THE INVARIANT (exact, summed over the workers; every request has ignore_eos and no stop
strings, so only max_tokens or an abort ends it):

    delta(generation_tokens) - delta(aborted_generation_tokens)
        == sum of the output tokens of the requests the engine FINISHED

Every token a worker samples belongs to a request that the engine then either finished or
aborted (the workers end idle); an aborted request's tokens are in both counters and cancel
out. The right side is known to the clients token for token:
  - `complete` requests: the completion_tokens of the final / usage they read;
  - `end` cancels: max_tokens. The engine finishes a request in the very step that samples
    its last token, so once the client holds that token the request is done, and the abort
    its cancel causes finds nothing (an unknown id is a no-op, not a waste);
  - Abort RPC requests: their final says which (ABORT, or LENGTH if the request won the race).
Every other request was aborted, or never reached the engine (no tokens in either counter):
`before` and `mid` cancels ask for 900 tokens and are cancelled within 8; to finish one anyway
the engine would have to run ~890 steps (seconds) ahead of the cancel. The two counters are
fed from different places (tokens sampled per step vs. the aborted request's own count at the
abort), so a token lost or counted twice on the abort path breaks the equality.

Bounds pin the aborted side: the Abort RPC's final carries the engine's own count of the
request's tokens, which must equal the tokens streamed before it; each `mid` cancel reached
the engine and could not finish, so it is one aborted request with at least the tokens its
client saw; and no request is aborted that was not cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.worker.metrics import read_counters
from tests.router.conftest import KEYS, Worker, free_port, router_config

SEED = 1729
N_REQUESTS = 2400
CONCURRENCY = 48
LONG = 900
"""max_tokens of `before` / `mid` requests: they must still be running when cancelled."""
KINDS = {"router_grpc": 0.35, "http": 0.25, "worker_grpc": 0.2, "worker_abort": 0.2}
PLANS = {"complete": 0.3, "before": 0.2, "mid": 0.3, "end": 0.2}
WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua quick brown fox").split()
CLIENT_TIMEOUT_S = 60.0
ABORTED = common_pb2.FINISH_REASON_ABORT
LENGTH = common_pb2.FINISH_REASON_LENGTH
HTTP_FINISH = {"length": LENGTH, "stop": common_pb2.FINISH_REASON_STOP}


class MeteredWorker(Worker):
    """A worker process that also serves Prometheus /metrics (the session's have none)."""

    def start(self) -> None:
        self.settings.setdefault("metrics_port", free_port())  # a restart keeps its port
        super().start()

    @property
    def metrics_port(self) -> int:
        return self.settings["metrics_port"]

    def counters(self) -> dict[str, float]:
        """The worker's counters by name (no prefix, no _total), summed over their labels."""
        return read_counters(f"http://127.0.0.1:{self.metrics_port}/metrics")


@dataclass
class Spec:
    """One request of the storm, drawn up front from the seeded RNG."""

    index: int
    kind: str
    plan: str
    max_tokens: int
    cut: int  # tokens to read before cancelling (mid, end)
    delay_s: float  # before cancelling without reading (before)
    prompt: str
    tier: str
    worker: int


@dataclass
class Outcome:
    received: int = 0  # output tokens the client got
    final_tokens: int | None = None  # completion_tokens of a final / usage the client read
    finish: int | None = None  # its finish reason (gRPC enum)
    uncached_prompt: int = 0  # prompt minus cached prompt tokens, from a worker's final
    error: str | None = None


def draw(n_workers: int) -> list[Spec]:
    rng = random.Random(SEED)
    specs = []
    for i in range(N_REQUESTS):
        kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
        plan = rng.choices(list(PLANS), list(PLANS.values()))[0]
        short = rng.randint(1, 12)
        max_tokens = LONG if plan in ("before", "mid") else short
        cut = {"mid": rng.randint(1, 8), "end": max_tokens}.get(plan, 0)
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        specs.append(Spec(i, kind, plan, max_tokens, cut, rng.uniform(0.0, 0.03), prompt,
                          rng.choice(("small", "large")), rng.randrange(n_workers)))
    return specs


def sampling() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)


async def read_grpc(call, spec: Spec, out: Outcome, on_final) -> None:
    """Reads a router or worker stream, cancelling it after `spec.cut` tokens (mid, end)."""
    if spec.plan == "before":
        await asyncio.sleep(spec.delay_s)
        call.cancel()
        return
    while True:
        msg = await call.read()
        assert msg is not grpc.aio.EOF, "stream ended without a final message"
        kind = msg.WhichOneof("kind")
        if kind == "chunk":
            out.received += len(msg.chunk.token_ids)
            if spec.plan in ("mid", "end") and out.received >= spec.cut:
                call.cancel()
                return
        elif kind in ("final", "complete"):
            on_final(msg)
            return
        else:
            raise AssertionError(f"error message: {msg}")


async def via_router_grpc(stub, spec: Spec, out: Outcome) -> None:
    req = router_pb2.GenerateRequest(
        request_id=f"storm-{spec.index}", prompt=spec.prompt, max_tokens=spec.max_tokens,
        sampling=sampling(), tier_hint=getattr(common_pb2, f"TIER_{spec.tier.upper()}"))
    call = stub.Generate(req, metadata=(("authorization", f"Bearer {KEYS['acme']}"),),
                         timeout=CLIENT_TIMEOUT_S)

    def on_final(msg) -> None:
        out.final_tokens, out.finish = msg.final.usage.completion_tokens, msg.final.finish_reason
    await read_grpc(call, spec, out, on_final)


def worker_final(out: Outcome):
    def on_final(msg) -> None:
        c = msg.complete
        out.final_tokens, out.finish = c.usage.completion_tokens, c.finish_reason
        out.uncached_prompt = c.usage.prompt_tokens - c.usage.cached_prompt_tokens
    return on_final


def worker_request(spec: Spec) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(request_id=f"storm-{spec.index}", prompt=spec.prompt,
                                      max_tokens=spec.max_tokens, sampling=sampling())


async def via_worker_grpc(stub, spec: Spec, out: Outcome) -> None:
    call = stub.Generate(worker_request(spec), timeout=CLIENT_TIMEOUT_S)
    await read_grpc(call, spec, out, worker_final(out))


async def via_worker_abort(stub, spec: Spec, out: Outcome) -> None:
    """Abort RPC at the planned point, then read the stream to its final message."""
    call = stub.Generate(worker_request(spec), timeout=CLIENT_TIMEOUT_S)
    if spec.plan == "before":
        await asyncio.sleep(spec.delay_s)
    else:
        while spec.plan != "complete" and out.received < spec.cut:
            msg = await call.read()
            assert msg.WhichOneof("kind") == "chunk", msg
            out.received += len(msg.chunk.token_ids)
    if spec.plan != "complete":
        rid = f"storm-{spec.index}"
        deadline = time.monotonic() + 10
        # Not found yet: the worker has not registered the call. `end` may already be done.
        while not (await stub.Abort(worker_pb2.AbortRequest(request_id=rid))).found:
            if spec.plan == "end":
                break
            assert time.monotonic() < deadline, f"{rid} never became abortable"
            await asyncio.sleep(0.005)
    spec_all = Spec(**{**spec.__dict__, "plan": "complete"})  # read everything that is left
    await read_grpc(call, spec_all, out, worker_final(out))
    assert out.received == out.final_tokens, "tokens streamed != the engine's count"


async def via_http(session: aiohttp.ClientSession, url: str, spec: Spec, out: Outcome) -> None:
    body = {"model": spec.tier, "prompt": spec.prompt, "max_tokens": spec.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    if spec.plan == "before":
        # The router answers headers with the first token: cancel the request before that.
        post = asyncio.ensure_future(session.post(url, json=body, headers=headers))
        await asyncio.sleep(spec.delay_s)
        post.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            (await post).close()  # it got its headers first: disconnect now
        return
    async with session.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: "):])
            if event.get("usage"):
                out.final_tokens = event["usage"]["completion_tokens"]
            elif (reason := event["choices"][0]["finish_reason"]) is not None:
                out.finish = HTTP_FINISH.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED)
            else:
                out.received += 1  # one SSE chunk per token (checked on completed requests)
                if spec.plan in ("mid", "end") and out.received >= spec.cut:
                    resp.close()  # drops the connection
                    return


async def storm(specs: list[Spec], router, workers: list[MeteredWorker]) -> list[Outcome]:
    outcomes = [Outcome() for _ in specs]
    gate = asyncio.Semaphore(CONCURRENCY)
    rchan = grpc.aio.insecure_channel(router.grpc_target)
    wchans = [grpc.aio.insecure_channel(w.address) for w in workers]
    rstub = router_pb2_grpc.RouterServiceStub(rchan)
    wstubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in wchans]
    url = f"{router.base_url}/completions"
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=0))

    async def one(spec: Spec, out: Outcome) -> None:
        async with gate:
            try:
                if spec.kind == "router_grpc":
                    await via_router_grpc(rstub, spec, out)
                elif spec.kind == "http":
                    await via_http(session, url, spec, out)
                elif spec.kind == "worker_grpc":
                    await via_worker_grpc(wstubs[spec.worker], spec, out)
                else:
                    await via_worker_abort(wstubs[spec.worker], spec, out)
            except (AssertionError, grpc.RpcError, aiohttp.ClientError) as exc:
                out.error = f"{spec.kind}/{spec.plan} #{spec.index}: {exc!r}"[:300]
    try:
        await asyncio.gather(*(one(s, o) for s, o in zip(specs, outcomes)))
    finally:
        await session.close()
        await rchan.close()
        for c in wchans:
            await c.close()
    return outcomes


@pytest.fixture(scope="module")
def storm_workers(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("storm-workers")
    workers = [MeteredWorker(str(tiny_models[seed]), f"storm-{tier}-{i}", tier, tmp=tmp)
               for i, (seed, tier) in enumerate(((0, "small"), (0, "small"), (1, "large")))]
    for w in workers:
        w.wait_serving()
    yield workers
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def storm_router(storm_workers, make_router):
    """A router over the storm's workers, without the response cache: every request reaches a
    worker. Stopped before its workers, so its load streams do not see them vanish."""
    router = make_router(router_config({"small": [w.address for w in storm_workers[:2]],
                                        "large": [storm_workers[2].address]}))
    yield router
    router.loop.run(router.server.stop(0.5), 10)


def test_cancellation_storm_frees_every_block_and_counts_the_waste(storm_workers, storm_router):
    workers, router = storm_workers, storm_router
    specs = draw(len(workers))
    before = [w.counters() for w in workers]
    start = time.monotonic()
    outcomes = asyncio.run(asyncio.wait_for(storm(specs, router, workers), 150))
    storm_s = time.monotonic() - start
    errors = [o.error for o in outcomes if o.error]
    assert not errors, f"{len(errors)} requests failed: {errors[:5]}"
    for w in workers:
        w.wait_idle(timeout=30)  # nothing running or queued, every KV block free
    after = [w.counters() for w in workers]
    delta = sum(map(Counter, after), Counter())
    delta.subtract(sum(map(Counter, before), Counter()))

    finished_tokens = wasted_floor = aborted_floor = aborted_ceiling = prefill_floor = 0
    for spec, out in zip(specs, outcomes):
        if spec.plan == "complete":
            assert (out.finish, out.final_tokens) == (LENGTH, spec.max_tokens), spec
            assert out.received == spec.max_tokens, spec  # one chunk per token, in every API
            finished_tokens += out.final_tokens
        elif spec.kind == "worker_abort":  # the engine's own count came back in the final
            if out.finish == ABORTED:
                wasted_floor += out.final_tokens
                aborted_floor += 1
                aborted_ceiling += 1
                prefill_floor += out.uncached_prompt if out.final_tokens else 0
            else:
                assert (out.finish, out.final_tokens) == (LENGTH, spec.max_tokens), spec
                finished_tokens += out.final_tokens
        elif spec.plan == "end":
            assert out.received == spec.max_tokens, spec
            finished_tokens += spec.max_tokens
        elif spec.plan == "mid":  # reached the engine, cannot have finished: aborted there
            assert out.received >= spec.cut and out.final_tokens is None, spec
            wasted_floor += out.received
            aborted_floor += 1
            aborted_ceiling += 1
        else:  # before: aborted, or cancelled before it reached the engine
            aborted_ceiling += 1

    counts = Counter((s.kind, s.plan) for s in specs)
    abort_rpc = Counter(("aborted" if o.finish == ABORTED else "finished first")
                        for s, o in zip(specs, outcomes)
                        if s.kind == "worker_abort" and s.plan != "complete")
    print(f"\nstorm: {len(specs)} requests in {storm_s:.1f} s; by (kind, plan): "
          f"{dict(sorted(counts.items()))}; Abort RPC outcomes: {dict(abort_rpc)}; "
          f"worker counter deltas: { {k: int(v) for k, v in sorted(delta.items())} }")

    generated, wasted = delta["generation_tokens"], delta["aborted_generation_tokens"]
    assert generated - wasted == finished_tokens, (generated, wasted, finished_tokens)
    assert wasted >= wasted_floor > 0
    assert aborted_floor <= delta["aborted_requests"] <= aborted_ceiling
    assert prefill_floor <= delta["aborted_prompt_tokens"] <= delta["prompt_tokens"]
    assert prefill_floor > 0
