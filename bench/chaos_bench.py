"""Chaos benchmark: faults injected into a running cluster under steady traffic, and what the
clients saw.

    .venv/bin/python bench/chaos_bench.py --json bench/results/chaos.json

Starts its own cluster on loopback (as bench/router_bench.py does): a private redis-server, the
cache service, two small-tier workers on SmolLM2 (one thread each) and the router. C clients
send greedy streaming requests through the router's gRPC Generate in a loop: a quarter repeat
one of a dozen questions (answered from the response cache once stored), the rest are new. Clients behave as a well-written client
does: a request refused with UNAVAILABLE or RESOURCE_EXHAUSTED is retried after a short pause
(the retry hint when given) up to --max-attempts times, its retries waiting for the channel to
reconnect (wait_for_ready). Each phase runs --phase-s seconds:

  steady            nothing injected
  worker SIGKILL    small-0 killed; restarted on the same port halfway through
  worker SIGSTOP    small-1 frozen; thawed (SIGCONT) halfway through
  redis restart     redis-server killed; restarted (empty) halfway through
  cache restart     the cache service stopped (SIGTERM); restarted halfway through
  router restart    the router stopped (SIGTERM) and started again at once

Per phase: requests, OK at the first attempt, OK after retries, failed with a clear status
(after retries), lost (no final message and no status by deadline + 5 s: must be 0), and the
cache results seen. A request's outcome is what its client finally got.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import yaml
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc

# Run as a script: bench/ is sys.path[0].
from router_bench import Cluster, free_port, wait_serving
from services.common.grpc_options import channel_options

API_KEY = "sk-chaos-bench-00001"
METADATA = (("authorization", f"Bearer {API_KEY}"),)
PROMPTS = [f"In one sentence, what is {topic}?" for topic in (
    "a prime number", "photosynthesis", "the speed of light", "a binary tree", "inflation",
    "a black hole", "an API", "the Pythagorean theorem", "a noun", "gravity", "a haiku",
    "a compiler")]
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


class Chaos:
    """The cluster's processes by name, each restartable with its original command."""

    def __init__(self, tmp: Path, args: argparse.Namespace):
        self.c = Cluster(tmp)
        self.tmp, self.args = tmp, args
        self.cmds: dict[str, list[str]] = {}
        self.procs: dict[str, object] = {}

    def spawn(self, name: str, cmd: list[str]) -> None:
        self.cmds[name] = cmd
        self.procs[name] = self.c.spawn(cmd, name)

    def restart(self, name: str) -> None:
        self.procs[name] = self.c.spawn(self.cmds[name], f"{name}-{int(time.time())}")

    def send(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        p = self.procs[name]
        p.send_signal(sig)
        p.wait(timeout=30)

    def start(self) -> str:
        redis_port, cache_port = free_port(), free_port()
        self.spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(self.tmp)])
        self.spawn("cache", [sys.executable, "-m", "services.cache", "--redis-url",
                             f"redis://127.0.0.1:{redis_port}/0", "--port", str(cache_port)])
        workers = []
        for i in range(2):
            port = free_port()
            self.spawn(f"small-{i}", [
                sys.executable, "-m", "services.worker", "--model", "smollm2", "--tier", "small",
                "--worker-id", f"small-{i}", "--port", str(port), "--threads", "1",
                "--max-model-len", "1024"])
            workers.append(f"127.0.0.1:{port}")
        grpc_port = free_port()
        config = {"grpc_port": grpc_port, "http_port": free_port(),
                  "tiers": {"small": {"replicas": workers}},
                  "tenants": {"chaos": {"api_keys": [API_KEY]}},
                  "classifier": {"enabled": False, "default_tier": "small"},
                  "cache": {"target": f"127.0.0.1:{cache_port}", "timeout_ms": 100},
                  "health": {"load_stale_after_s": 2.0, "keepalive_time_s": 2.0,
                             "keepalive_timeout_s": 2.0, "probe_interval_s": 0.25,
                             "max_probe_interval_s": 1.0}}
        (self.tmp / "router.yaml").write_text(yaml.safe_dump(config))
        for w in workers:
            wait_serving(w)
        wait_serving(f"127.0.0.1:{cache_port}")
        self.spawn("router", [sys.executable, "-m", "services.router", "--config",
                              str(self.tmp / "router.yaml")])
        self.target = f"127.0.0.1:{grpc_port}"
        wait_serving(self.target)
        time.sleep(1.0)
        return self.target


async def request(stub, rng: random.Random, args: argparse.Namespace) -> dict:
    """One logical request with client retries; returns its record."""
    prompt = rng.choice(PROMPTS)
    if rng.random() >= args.repeat_share:  # a new question: the cache cannot answer it
        prompt = f"{prompt} Request {rng.getrandbits(48):x}."
    req = router_pb2.GenerateRequest(
        prompt=prompt, max_tokens=args.max_tokens,
        sampling=common_pb2.SamplingParams(temperature=0.0))
    rec = {"attempts": 0, "codes": [], "outcome": None, "cache": None}
    deadline = time.monotonic() + args.deadline_s
    while rec["attempts"] < args.max_attempts:
        rec["attempts"] += 1
        # After a failure, wait for the channel to reconnect instead of failing fast while
        # it backs off (the router may be restarting).
        call = stub.Generate(req, metadata=METADATA, wait_for_ready=rec["attempts"] > 1,
                             timeout=max(0.1, deadline - time.monotonic()))
        try:
            async for msg in call:
                if msg.WhichOneof("kind") == "final":
                    rec["outcome"] = "ok"
                    rec["cache"] = common_pb2.CacheResult.Name(msg.final.route.cache_result)
            if rec["outcome"] != "ok":
                rec["outcome"] = "no final message"
            return rec
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            rec["codes"].append(code.name)
            if code not in RETRYABLE or time.monotonic() >= deadline:
                rec["outcome"] = code.name
                return rec
            hint = dict(await call.trailing_metadata() or ()).get("retry-after")
            await asyncio.sleep(min(float(hint) if hint else 0.5, 2.0))
    rec["outcome"] = rec["codes"][-1]
    return rec


async def traffic(target: str, phase: dict, stop: asyncio.Event, args: argparse.Namespace,
                  seed: int) -> None:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target, options=channel_options()) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        while not stop.is_set():
            name = phase["name"]
            try:
                rec = await asyncio.wait_for(request(stub, rng, args), args.deadline_s + 5)
            except asyncio.TimeoutError:
                rec = {"attempts": 0, "codes": [], "outcome": "lost", "cache": None}
            phase["records"].setdefault(name, []).append(rec)


async def run(chaos: Chaos, args: argparse.Namespace) -> dict:
    phase = {"name": "steady", "records": {}}
    stop = asyncio.Event()
    clients = [asyncio.create_task(traffic(chaos.target, phase, stop, args, i))
               for i in range(args.concurrency)]
    loop = asyncio.get_running_loop()

    def restart_router() -> None:
        chaos.stop("router")
        chaos.restart("router")

    # (phase, inject, heal): inject at the start, heal halfway (None: nothing to do).
    phases = [
        ("steady", None, None),
        ("worker SIGKILL", lambda: chaos.stop("small-0", signal.SIGKILL),
         lambda: chaos.restart("small-0")),
        ("worker SIGSTOP", lambda: chaos.send("small-1", signal.SIGSTOP),
         lambda: chaos.send("small-1", signal.SIGCONT)),
        ("redis restart", lambda: chaos.stop("redis", signal.SIGKILL),
         lambda: chaos.restart("redis")),
        ("cache restart", lambda: chaos.stop("cache"), lambda: chaos.restart("cache")),
        ("router restart", restart_router, None),
        ("steady after", None, None),
    ]
    for name, inject, heal in phases:
        phase["name"] = name
        print(f"phase: {name}", flush=True)
        for action in (inject, heal):
            if action is not None:  # in a thread: stopping waits for the process to exit
                await loop.run_in_executor(None, action)
            await asyncio.sleep(args.phase_s / 2)
    stop.set()
    await asyncio.gather(*clients)
    return phase["records"]


def summarize(records: dict) -> list[dict]:
    rows = []
    for name, recs in records.items():
        outcomes = Counter(r["outcome"] for r in recs)
        rows.append({
            "phase": name, "requests": len(recs),
            "ok_first_attempt": sum(1 for r in recs if r["outcome"] == "ok" and r["attempts"] == 1),
            "ok_after_retry": sum(1 for r in recs if r["outcome"] == "ok" and r["attempts"] > 1),
            "failed": {k: v for k, v in outcomes.items() if k not in ("ok", "lost")},
            "lost": outcomes.get("lost", 0),
            "first_attempt_errors": dict(Counter(c for r in recs for c in r["codes"])),
            "cache": dict(Counter(r["cache"] for r in recs if r["cache"]))})
    return rows


def report(rows: list[dict]) -> None:
    print("\n| phase | requests | OK first try | OK after retry | failed (status) | lost "
          "| refusals seen by clients | cache results |")
    print("|" + "---|" * 8)
    for r in rows:
        failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "0"
        seen = ", ".join(f"{k} {v}" for k, v in r["first_attempt_errors"].items()) or "-"
        cache = ", ".join(f"{k.removeprefix('CACHE_RESULT_').lower()} {v}"
                          for k, v in sorted(r["cache"].items()))
        print(f"| {r['phase']} | {r['requests']} | {r['ok_first_attempt']} | "
              f"{r['ok_after_retry']} | {failed} | {r['lost']} | {seen} | {cache} |")
    lost = sum(r["lost"] for r in rows)
    print(f"\nrequests lost: {lost} (target 0)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phase-s", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeat-share", type=float, default=0.25,
                   help="share of requests repeating a fixed question (cacheable)")
    p.add_argument("--max-attempts", type=int, default=5)
    p.add_argument("--deadline-s", type=float, default=30.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chaos-bench-") as tmp:
        chaos = Chaos(Path(tmp), args)
        try:
            chaos.start()
            records = asyncio.run(run(chaos, args))
        finally:
            for proc in chaos.procs.values():  # thaw before the cluster's SIGTERM
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
            chaos.c.stop()
    rows = summarize(records)
    report(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "phases": rows, "lost": sum(r["lost"] for r in rows),
            "args": {k: str(v) for k, v in vars(args).items()},
            "run": {"when": datetime.datetime.now().isoformat(timespec="seconds"),
                    "host": platform.node()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
