"""Soak benchmark: the whole cluster under steady load with random client cancels for a long
time; reports errors, leaked KV blocks and each process's memory trend.

    .venv/bin/python bench/soak_bench.py --json bench/results/soak.json   # 20 minutes

Starts its own cluster on loopback: a private redis-server (free port, no persistence), the
cache service (`python -m services.cache`), one small-tier worker on SmolLM2-135M (`python -m
services.worker --model smollm2`, with --metrics-port) and the router (`python -m
services.router`, classifier on, response cache on). Then:

1. capacity: a ramp of closed loops at concurrency 1, 2, 4, ... (--ramp-step-s each, no
   cancels) until finished req/s has not grown by 5% for two steps; capacity = the best step
   (or --capacity-rps to skip the ramp).
2. soak: an open loop of Poisson arrivals at --load-fraction x capacity for --duration-s. Each
   request is a seeded prompt cut from real English text (--min/--max-prompt-tokens), greedy,
   `ignore_eos`, --max-tokens output tokens, model "auto", sent half through the router's gRPC
   Generate and half through the OpenAI API (streamed chat completions), --http-fraction. A
   --cancel-fraction of them is cancelled by the client at a random point: a quarter before
   the first token (after a random delay of up to 0.5 s, nothing read), the rest after a random
   number of tokens (the gRPC stream cancelled / the HTTP connection dropped).
3. end: waits for the outstanding requests, then for the worker to be idle, and reads its KV
   blocks (GetLoad): leaked = total - free, which must be 0.

Every --sample-interval-s the resident memory (VmRSS from /proc/<pid>/status) of each process
(redis, cache, worker, router, and this client) is sampled; the table gives each one's first,
last and largest value and a least-squares slope in MB/hour over the soak, and over its second
half (past the warm-up allocations: the number to watch for a leak). Redis and the cache grow
by design while they store answers (one entry per distinct prompt, until eviction).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import yaml
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

# Run as a script: bench/ is sys.path[0].
from prompts import PromptFactory
from rss import memory_report, sample_rss
from router_bench import Cluster, free_port, pct, wait_serving
from services.common.assets import smollm2_gguf_path
from services.worker.metrics import read_counters
from services.worker.tokenizer import Tokenizer

API_KEY = "sk-soak-bench-000001"
METADATA = (("authorization", f"Bearer {API_KEY}"),)
DEADLINE_S = 120.0


@dataclass
class Outcome:
    status: str  # "finished", "cancelled" or "error"
    api: str
    planned_cancel: str = ""  # "", "before" (first token) or "mid"
    code: str = ""  # for errors: "grpc:<CODE>", "http:<status>", "http:stream_error", ...
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    cache: str = ""


@dataclass(frozen=True)
class Plan:
    """One request, drawn from the seeded RNG."""

    prompt: str
    api: str  # "grpc" or "http"
    cancel: str  # "", "before" or "mid"
    cancel_after_s: float
    cancel_after_tokens: int


# --- cluster ---------------------------------------------------------------------------------

def start(c: Cluster, args: argparse.Namespace) -> dict:
    redis_port, cache_port, worker_port, metrics_port = (free_port() for _ in range(4))
    procs = {}
    procs["redis"] = c.spawn([
        shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port),
        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(c.tmp)], "redis")
    procs["cache"] = c.spawn([sys.executable, "-m", "services.cache", "--redis-url",
                              f"redis://127.0.0.1:{redis_port}/0", "--port", str(cache_port)],
                             "cache")
    env, c.env = c.env, dict(c.env, OMP_NUM_THREADS=str(args.worker_threads),
                             OMP_WAIT_POLICY="PASSIVE")
    procs["worker"] = c.spawn([
        sys.executable, "-m", "services.worker", "--model", "smollm2", "--tier", "small",
        "--worker-id", "small-0", "--port", str(worker_port), "--threads",
        str(args.worker_threads), "--max-model-len", "1024", "--num-kv-blocks", "512",
        "--metrics-port", str(metrics_port)], "worker")
    c.env = env
    grpc_port, http_port = free_port(), free_port()
    config = {"grpc_port": grpc_port, "http_port": http_port,
              "tiers": {"small": {"replicas": [f"127.0.0.1:{worker_port}"],
                                  "slo": {"ttft_ms": 3000, "tpot_ms": 400}}},
              "tenants": {"bench": {"api_keys": [API_KEY]}},
              "cache": {"target": f"127.0.0.1:{cache_port}", "timeout_ms": 200}}
    (c.tmp / "router.yaml").write_text(yaml.safe_dump(config))
    wait_serving(f"127.0.0.1:{worker_port}")
    wait_serving(f"127.0.0.1:{cache_port}")
    procs["router"] = c.spawn([sys.executable, "-m", "services.router", "--config",
                               str(c.tmp / "router.yaml")], "router")
    wait_serving(f"127.0.0.1:{grpc_port}")
    time.sleep(1.0)  # the router's first WatchLoad snapshots
    return {"grpc": f"127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}/v1",
            "worker": f"127.0.0.1:{worker_port}",
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
            "pids": {**{n: p.pid for n, p in procs.items()}, "client": os.getpid()}}


# --- requests --------------------------------------------------------------------------------

class Client:
    """The two APIs, with client-side cancellation at the planned point."""

    def __init__(self, cluster: dict, args: argparse.Namespace):
        self.args = args
        self.channel = grpc.aio.insecure_channel(cluster["grpc"])
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        self.url = f"{cluster['http']}/chat/completions"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=DEADLINE_S))

    async def close(self) -> None:
        await self.session.close()
        await self.channel.close()

    async def run(self, plan: Plan) -> Outcome:
        out = Outcome("finished", plan.api, plan.cancel)
        start = time.perf_counter()
        try:
            go = self._grpc if plan.api == "grpc" else self._http
            await asyncio.wait_for(go(plan, out, start), DEADLINE_S + 5)
        except grpc.aio.AioRpcError as exc:
            out.status, out.code = "error", f"grpc:{exc.code().name}"
        except aiohttp.ClientError as exc:
            out.status, out.code = "error", f"http:{type(exc).__name__}"
        except asyncio.TimeoutError:
            out.status, out.code = "error", "client_timeout"
        if out.status == "finished":
            out.e2e_s = time.perf_counter() - start
        return out

    def _token(self, out: Outcome, start: float, n: int) -> None:
        if out.ttft_s is None and n:
            out.ttft_s = time.perf_counter() - start
        out.tokens += n

    def _cut(self, plan: Plan, out: Outcome) -> bool:
        return plan.cancel == "mid" and out.tokens >= plan.cancel_after_tokens

    async def _grpc(self, plan: Plan, out: Outcome, start: float) -> None:
        req = router_pb2.GenerateRequest(
            chat=common_pb2.Conversation(messages=[common_pb2.ChatMessage(
                role=common_pb2.ROLE_USER, content=plan.prompt)]),
            max_tokens=self.args.max_tokens,
            sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True))
        call = self.stub.Generate(req, metadata=METADATA, timeout=DEADLINE_S)
        if plan.cancel == "before":
            await asyncio.sleep(plan.cancel_after_s)
            call.cancel()
            out.status = "cancelled"
            return
        async for msg in call:
            if msg.WhichOneof("kind") == "chunk":
                self._token(out, start, len(msg.chunk.token_ids))
                if self._cut(plan, out):
                    call.cancel()
                    out.status = "cancelled"
                    return
            else:
                out.cache = common_pb2.CacheResult.Name(msg.final.route.cache_result) \
                    .removeprefix("CACHE_RESULT_").lower()

    async def _http(self, plan: Plan, out: Outcome, start: float) -> None:
        body = {"model": "auto", "messages": [{"role": "user", "content": plan.prompt}],
                "max_tokens": self.args.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        if plan.cancel == "before":
            post = asyncio.ensure_future(self.session.post(self.url, json=body, headers=headers))
            await asyncio.sleep(plan.cancel_after_s)
            post.cancel()
            try:
                (await post).close()  # it had its headers already: drop the connection now
            except asyncio.CancelledError:
                pass
            out.status = "cancelled"
            return
        async with self.session.post(self.url, json=body, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                out.status, out.code = "error", f"http:{resp.status}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    out.status, out.code = "error", "http:stream_error"
                    return
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content") is not None \
                        and choices[0].get("finish_reason") is None:
                    self._token(out, start, 1)  # one SSE chunk per generated token
                    if self._cut(plan, out):
                        resp.close()  # drops the connection: the router aborts the request
                        out.status = "cancelled"
                        return
                if "switchyard" in event:
                    out.cache = event["switchyard"].get("cache_result", "")


def planner(args: argparse.Namespace, seed: int, cancels: bool):
    """An endless, seeded stream of request plans."""
    import gguf

    factory = PromptFactory(Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path())))
    rng = random.Random(seed)
    while True:
        prompt = factory.make(rng.randint(args.min_prompt_tokens, args.max_prompt_tokens)).text
        api = "http" if rng.random() < args.http_fraction else "grpc"
        cancel = ""
        if cancels and rng.random() < args.cancel_fraction:
            # A quarter before the first token (queued or prefilling), the rest mid-stream.
            cancel = "before" if rng.random() < 0.25 else "mid"
        yield Plan(prompt, api, cancel, rng.uniform(0.0, 0.5), rng.randint(1, args.max_tokens - 1))


async def closed_loop(client: Client, plans, concurrency: int, seconds: float) -> float:
    """Finished requests per second with `concurrency` clients always busy."""
    end = time.perf_counter() + seconds
    done = 0

    async def one() -> None:
        nonlocal done
        while time.perf_counter() < end:
            done += (await client.run(next(plans))).status == "finished"
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    return done / (time.perf_counter() - t0)


async def ramp(client: Client, args: argparse.Namespace) -> tuple[float, list[dict]]:
    plans = planner(args, args.seed + 1, cancels=False)
    await closed_loop(client, plans, 2, 5.0)  # warm-up (first steps, classifier, cache)
    steps: list[dict] = []
    best = 0.0
    flat = 0  # steps in a row that did not beat the best by 5% (two end the ramp: one may be
    # noise on a shared machine)
    concurrency = 1
    while concurrency <= args.max_ramp_concurrency and flat < 2:
        rps = await closed_loop(client, plans, concurrency, args.ramp_step_s)
        steps.append({"concurrency": concurrency, "finished_rps": rps})
        print(f"ramp: concurrency {concurrency}: {rps:.2f} req/s", flush=True)
        flat = flat + 1 if rps < best * 1.05 else 0
        best = max(best, rps)
        concurrency *= 2
    return best, steps


# --- soak ------------------------------------------------------------------------------------

async def soak(client: Client, args: argparse.Namespace, rate: float, pids: dict[str, int]):
    plans = planner(args, args.seed, cancels=True)
    rng = random.Random(args.seed + 2)
    series: dict[str, list] = {}
    sampler = asyncio.create_task(sample_rss(pids, args.sample_interval_s, series))
    tasks: list[asyncio.Task] = []
    t0 = time.perf_counter()
    next_at, next_report = t0, t0 + 60
    while next_at < t0 + args.duration_s:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(client.run(next(plans))))
        next_at += rng.expovariate(rate)
        if time.perf_counter() >= next_report:
            done = sum(t.done() for t in tasks)
            print(f"soak: {time.perf_counter() - t0:.0f} s, sent {len(tasks)}, done {done}",
                  flush=True)
            next_report += 60
    outcomes = list(await asyncio.gather(*tasks))
    sampler.cancel()
    return outcomes, series, time.perf_counter() - t0


def wait_idle(target: str, timeout_s: float = 60.0) -> worker_pb2.Load:
    with grpc.insecure_channel(target) as ch:
        stub = worker_pb2_grpc.WorkerServiceStub(ch)
        deadline = time.monotonic() + timeout_s
        while True:
            load = stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
            idle = load.num_running == load.num_waiting == 0
            if (idle and load.kv_blocks_free == load.kv_blocks_total) or \
                    time.monotonic() > deadline:
                return load
            time.sleep(0.2)


def summarize(outcomes: list[Outcome], load: worker_pb2.Load, wall_s: float) -> dict:
    by = Counter(o.status for o in outcomes)
    errors = Counter(o.code for o in outcomes if o.status == "error")
    fin = [o for o in outcomes if o.status == "finished"]
    return {
        "sent": len(outcomes), "finished": by["finished"], "cancelled": by["cancelled"],
        "cancelled_by_plan": dict(Counter(o.planned_cancel for o in outcomes
                                          if o.status == "cancelled")),
        "errors": by["error"], "errors_by_code": dict(errors),
        "error_rate": by["error"] / len(outcomes) if outcomes else 0.0,
        "by_api": dict(Counter(f"{o.api}:{o.status}" for o in outcomes)),
        "cache_results": dict(Counter(o.cache for o in fin if o.cache)),
        "ttft_s": pct([o.ttft_s for o in fin if o.ttft_s is not None]),
        "e2e_s": pct([o.e2e_s for o in fin if o.e2e_s is not None]),
        "achieved_rps": len(outcomes) / wall_s if wall_s else 0.0,
        "kv_blocks_total": load.kv_blocks_total, "kv_blocks_free": load.kv_blocks_free,
        "leaked_kv_blocks": load.kv_blocks_total - load.kv_blocks_free,
        "running_after": load.num_running, "waiting_after": load.num_waiting,
    }


def report(res: dict) -> None:
    s = res["soak"]
    print(f"\nsoak: {res['args']['duration_s']} s at {res['load_fraction']:g} x capacity "
          f"{res['capacity_rps']:.2f} req/s ({res['capacity_source']}) = "
          f"{res['offered_rps']:.2f} req/s offered; cancel fraction {res['cancel_fraction']:g}\n")
    print("| sent | finished | cancelled (before / mid) | errors | error rate | leaked KV blocks |")
    print("|---|---|---|---|---|---|")
    cb = s["cancelled_by_plan"]
    print(f"| {s['sent']} | {s['finished']} | {s['cancelled']} ({cb.get('before', 0)} / "
          f"{cb.get('mid', 0)}) | {s['errors']} | {s['error_rate']:.2%} | "
          f"{s['leaked_kv_blocks']} of {s['kv_blocks_total']} |")
    print(f"\nerrors by status: {s['errors_by_code'] or 'none'}; by API: {s['by_api']}")
    print(f"cache results (finished): {s['cache_results']}")
    t, e = s["ttft_s"], s["e2e_s"]
    print(f"finished: TTFT p50 {t.get('p50', 0):.2f} s, p99 {t.get('p99', 0):.2f} s; "
          f"end-to-end p50 {e.get('p50', 0):.2f} s, p99 {e.get('p99', 0):.2f} s")
    w = res["worker_counters"]
    print(f"worker: {w.get('aborted_requests', 0):.0f} requests aborted, wasted "
          f"{w.get('aborted_prompt_tokens', 0):.0f} prefill + "
          f"{w.get('aborted_generation_tokens', 0):.0f} output tokens (of "
          f"{w.get('prompt_tokens', 0):.0f} + {w.get('generation_tokens', 0):.0f})\n")
    print("| process | RSS first MB | last MB | max MB | slope MB/h | 2nd-half slope MB/h |")
    print("|---|---|---|---|---|---|")
    for name, m in res["memory"].items():
        def f(v):
            return "n/a" if v is None else f"{v:+.1f}"
        print(f"| {name} | {m['first_mb']:.1f} | {m['last_mb']:.1f} | {m['max_mb']:.1f} | "
              f"{f(m['slope_mb_per_h'])} | {f(m['slope_2nd_half_mb_per_h'])} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=1200.0, help="soak length (20 min)")
    p.add_argument("--load-fraction", type=float, default=0.7, help="share of capacity")
    p.add_argument("--capacity-rps", type=float, help="skip the ramp; capacity in req/s")
    p.add_argument("--cancel-fraction", type=float, default=0.2)
    p.add_argument("--http-fraction", type=float, default=0.5,
                   help="share of requests sent through the OpenAI API (the rest gRPC)")
    p.add_argument("--ramp-step-s", type=float, default=15.0)
    p.add_argument("--max-ramp-concurrency", type=int, default=32)
    p.add_argument("--min-prompt-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=160)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--worker-threads", type=int, default=2)
    p.add_argument("--sample-interval-s", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results (and RSS samples) here")
    args = p.parse_args(argv)
    if not 0 < args.load_fraction or not 0 <= args.cancel_fraction <= 1 or args.max_tokens < 2:
        p.error("need --load-fraction > 0, --cancel-fraction in [0, 1], --max-tokens >= 2")
    return args


async def run(cluster: dict, args: argparse.Namespace) -> dict:
    client = Client(cluster, args)
    try:
        if args.capacity_rps:
            capacity, source, steps = args.capacity_rps, "given", []
        else:
            capacity, steps = await ramp(client, args)
            source = f"ramp of closed loops, {args.ramp_step_s:g} s a step"
        rate = args.load_fraction * capacity
        print(f"soak: {rate:.2f} req/s for {args.duration_s:g} s", flush=True)
        before = read_counters(cluster["metrics"])
        outcomes, series, wall = await soak(client, args, rate, cluster["pids"])
    finally:
        await client.close()
    load = wait_idle(cluster["worker"])
    after = read_counters(cluster["metrics"])
    return {"capacity_rps": capacity, "capacity_source": source, "ramp": steps,
            "load_fraction": args.load_fraction, "offered_rps": rate,
            "cancel_fraction": args.cancel_fraction, "wall_s": wall,
            "soak": summarize(outcomes, load, wall),
            "worker_counters": {k: after[k] - before.get(k, 0.0) for k in after},
            "memory": memory_report(series)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-bench-") as tmp:
        c = Cluster(Path(tmp))
        try:
            res = asyncio.run(run(start(c, args), args))
        finally:
            c.stop()
    res["args"] = {k: str(v) for k, v in vars(args).items()}
    res["run"] = {"when": datetime.datetime.now().isoformat(timespec="seconds"),
                  "host": platform.node(), "python": platform.python_version()}
    report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res["soak"]["leaked_kv_blocks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
