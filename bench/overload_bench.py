"""Overload benchmark: goodput of one small-tier worker behind the router at 1x, 2x and 4x its
capacity.

    .venv/bin/python bench/overload_bench.py --json bench/results/overload.json

Starts its own cluster on loopback: one worker (`python -m services.worker --model smollm2
--tier small`, float32, `--threads 2` with OMP_WAIT_POLICY=PASSIVE, `--max-waiting` small so
its queue cannot hold more than about a second of work) and the router (`python -m
services.router`, one thread, classifier off, no response cache). Then:

1. capacity: a closed loop at concurrency = the worker's max_num_seqs for --capacity-s seconds;
   capacity = finished requests per second (or --capacity-rps to skip the measurement).
2. for each level L in --levels: an open loop of Poisson arrivals at L x capacity for
   --duration-s seconds, each request a seeded raw prompt (--min/--max-prompt-tokens) with
   greedy `ignore_eos` decoding of --max-tokens tokens, streamed through the router's gRPC
   Generate. A request counts toward goodput when it finishes with TTFT <= --slo-ttft-ms and
   TPOT <= --slo-tpot-ms (client-side); goodput = such requests per second from the first
   request sent to the last one answered. Refusals (RESOURCE_EXHAUSTED with a retry hint) are
   counted, not retried.

Prints a table (offered, finished, refused, errors, goodput req/s, TTFT/TPOT p50/p99) and
checks the issue's target: goodput at 2x >= 80% of the peak goodput (no collapse).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc

# Run as a script: bench/ is sys.path[0].
from prompts import PromptFactory
from router_bench import Cluster, free_port, pct, wait_serving
from services.common.assets import smollm2_gguf_path
from services.worker.tokenizer import Tokenizer

API_KEY = "sk-overload-bench-0001"
METADATA = (("authorization", f"Bearer {API_KEY}"),)


@dataclass
class Outcome:
    sent: float
    status: str
    """"ok", "refused" (RESOURCE_EXHAUSTED) or the gRPC code name of another failure."""
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens: int = 0
    retry_after: str | None = None
    ended: float = 0.0


def start(c: Cluster, args: argparse.Namespace) -> str:
    port = free_port()
    worker_env = dict(c.env, OMP_NUM_THREADS=str(args.worker_threads), OMP_WAIT_POLICY="PASSIVE")
    env, c.env = c.env, worker_env
    c.spawn([sys.executable, "-m", "services.worker", "--model", "smollm2", "--tier", "small",
             "--worker-id", "small-0", "--port", str(port), "--threads",
             str(args.worker_threads), "--max-num-seqs", str(args.max_num_seqs),
             "--max-waiting", str(args.max_waiting), "--max-model-len", "1024"], "worker")
    c.env = env
    grpc_port, http_port = free_port(), free_port()
    config = {"grpc_port": grpc_port, "http_port": http_port,
              "tiers": {"small": {"replicas": [f"127.0.0.1:{port}"],
                                  "slo": {"ttft_ms": args.slo_ttft_ms,
                                          "tpot_ms": args.slo_tpot_ms}}},
              "tenants": {"bench": {"api_keys": [API_KEY]}},
              "classifier": {"enabled": False, "default_tier": "small"}}
    (c.tmp / "router.yaml").write_text(yaml.safe_dump(config))
    wait_serving(f"127.0.0.1:{port}")
    c.spawn([sys.executable, "-m", "services.router", "--config", str(c.tmp / "router.yaml")],
            "router")
    target = f"127.0.0.1:{grpc_port}"
    wait_serving(target)
    time.sleep(1.0)  # the router's first WatchLoad snapshots
    return target


def make_prompts(args: argparse.Namespace, n: int) -> list[str]:
    import gguf

    factory = PromptFactory(Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path())))
    rng = random.Random(args.seed)
    return [factory.make(rng.randint(args.min_prompt_tokens, args.max_prompt_tokens)).text
            for _ in range(n)]


async def one(stub, prompt: str, max_tokens: int) -> Outcome:
    req = router_pb2.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, tier_hint=common_pb2.TIER_SMALL,
        sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True),
        cache=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED))
    out = Outcome(sent=time.perf_counter(), status="ok")
    first = last = None
    call = stub.Generate(req, metadata=METADATA, timeout=120)
    try:
        async for msg in call:
            if msg.WhichOneof("kind") == "chunk" and msg.chunk.token_ids:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
                out.tokens += len(msg.chunk.token_ids)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        out.status = "refused" if code == grpc.StatusCode.RESOURCE_EXHAUSTED else code.name
        out.retry_after = dict(await call.trailing_metadata() or ()).get("retry-after")
        out.ended = time.perf_counter()
        return out
    out.ended = time.perf_counter()
    out.ttft_s = first - out.sent if first is not None else None
    if first is not None and out.tokens > 1:
        out.tpot_s = (last - first) / (out.tokens - 1)
    return out


async def closed_loop(target: str, prompts: list[str], concurrency: int, seconds: float,
                      max_tokens: int) -> float:
    """Finished requests per second with `concurrency` clients always busy."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        end = time.perf_counter() + seconds
        done = 0
        i = 0

        async def client() -> None:
            nonlocal done, i
            while time.perf_counter() < end:
                p = prompts[i % len(prompts)]
                i += 1
                if (await one(stub, p, max_tokens)).status == "ok":
                    done += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0)


async def open_loop(target: str, prompts: list[str], rate: float, seconds: float,
                    max_tokens: int, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        tasks = []
        t0 = time.perf_counter()
        next_at = t0
        i = 0
        while next_at < t0 + seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(stub, prompts[i % len(prompts)], max_tokens)))
            i += 1
            next_at += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


def summarize(level: float, rate: float, outs: list[Outcome], args: argparse.Namespace) -> dict:
    """Goodput = requests that met both SLOs per second of the whole run, from the first
    request sent to the last one answered (the tail after the sending window included)."""
    seconds = max(o.ended for o in outs) - min(o.sent for o in outs)
    ok = [o for o in outs if o.status == "ok"]
    good = [o for o in ok if o.ttft_s is not None and o.ttft_s * 1000 <= args.slo_ttft_ms
            and (o.tpot_s is None or o.tpot_s * 1000 <= args.slo_tpot_ms)]
    refused = [o for o in outs if o.status == "refused"]
    errors: dict[str, int] = {}
    for o in outs:
        if o.status not in ("ok", "refused"):
            errors[o.status] = errors.get(o.status, 0) + 1
    return {"level": level, "offered_rps": rate, "sent": len(outs), "finished": len(ok),
            "refused": len(refused),
            "refused_with_retry_hint": sum(1 for o in refused if o.retry_after),
            "errors": errors, "goodput_rps": len(good) / seconds, "run_s": seconds,
            "slo_met_share_of_finished": len(good) / len(ok) if ok else 0.0,
            "ttft_s": pct([o.ttft_s for o in ok if o.ttft_s is not None]),
            "tpot_s": pct([o.tpot_s for o in ok if o.tpot_s is not None])}


def report(res: dict) -> None:
    print(f"\ncapacity: {res['capacity_rps']:.2f} req/s ({res['capacity_source']}); SLO TTFT <= "
          f"{res['slo_ttft_ms']:.0f} ms, TPOT <= {res['slo_tpot_ms']:.0f} ms\n")
    head = ("| load | offered req/s | sent | finished | refused (hint) | errors | goodput req/s "
            "| TTFT p50 / p99 s | TPOT p50 / p99 ms |")
    print(head)
    print("|" + "---|" * 9)
    for r in res["levels"]:
        t, p = r["ttft_s"], r["tpot_s"]
        print(f"| {r['level']:g}x | {r['offered_rps']:.2f} | {r['sent']} | {r['finished']} | "
              f"{r['refused']} ({r['refused_with_retry_hint']}) | {sum(r['errors'].values())} | "
              f"{r['goodput_rps']:.2f} | {t.get('p50', 0):.2f} / {t.get('p99', 0):.2f} | "
              f"{p.get('p50', 0) * 1000:.0f} / {p.get('p99', 0) * 1000:.0f} |")
    v = res["verdict"]
    print(f"\npeak goodput {v['peak_goodput_rps']:.2f} req/s; at 2x {v['goodput_2x_rps']:.2f} "
          f"= {v['ratio_2x']:.0%} of peak (target >= 80%): {'PASS' if v['pass'] else 'FAIL'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,2,4", help="load levels, multiples of capacity")
    p.add_argument("--duration-s", type=float, default=45.0, help="seconds per level")
    p.add_argument("--capacity-s", type=float, default=45.0)
    p.add_argument("--capacity-rps", type=float, help="skip the capacity measurement")
    p.add_argument("--min-prompt-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=192)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=400.0)
    p.add_argument("--worker-threads", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-waiting", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [float(x) for x in args.levels.split(",")]
    prompts = make_prompts(args, 400)
    with tempfile.TemporaryDirectory(prefix="overload-bench-") as tmp:
        c = Cluster(Path(tmp))
        try:
            target = start(c, args)
            asyncio.run(closed_loop(target, prompts[:4], 4, 3.0, args.max_tokens))  # warm-up
            if args.capacity_rps:
                capacity, source = args.capacity_rps, "given"
            else:
                capacity = asyncio.run(closed_loop(target, prompts, args.max_num_seqs,
                                                   args.capacity_s, args.max_tokens))
                source = f"closed loop, concurrency {args.max_num_seqs}, {args.capacity_s:g} s"
            rows = []
            for i, level in enumerate(levels):
                outs = asyncio.run(open_loop(target, prompts, level * capacity, args.duration_s,
                                             args.max_tokens, args.seed + i))
                rows.append(summarize(level, level * capacity, outs, args))
                print(f"{level:g}x done: goodput {rows[-1]['goodput_rps']:.2f} req/s",
                      flush=True)
        finally:
            c.stop()
    peak = max(r["goodput_rps"] for r in rows)
    at2 = next((r["goodput_rps"] for r in rows if r["level"] == 2.0), float("nan"))
    res = {"capacity_rps": capacity, "capacity_source": source,
           "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "levels": rows,
           "verdict": {"peak_goodput_rps": peak, "goodput_2x_rps": at2,
                       "ratio_2x": at2 / peak if peak else 0.0,
                       "pass": bool(peak and at2 >= 0.8 * peak)},
           "args": {k: str(v) for k, v in vars(args).items()},
           "run": {"when": datetime.datetime.now().isoformat(timespec="seconds"),
                   "host": platform.node(), "python": platform.python_version()}}
    report(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
