"""Router benchmark: routing overhead, classifier latency, and a mixed workload by tier.

    .venv/bin/python bench/router_bench.py --json bench/router.json

Starts its own cluster on loopback: redis-server (free port, no persistence), the cache service
(`python -m services.cache`), three workers (`python -m services.worker`, one thread each) and
the router (`python -m services.router --config <generated yaml>`, one thread):

  small      SmolLM2-135M-Instruct (the packaged GGUF)
  quantized  a tiny random Llama (2 layers, hidden 64, SmolLM2's tokenizer), seed 2
  large      the same tiny architecture, seed 1

The tiny models stand in for bigger tiers (only SmolLM2 ships with the repo); they keep the
overhead measurement's worker-side noise small (prefill of a short prompt ~3 ms).

1. classifier: in this process, DifficultyClassifier.score on every prompt of the labelled set
   (services/router/classifier/data/prompts.tsv), LRU off, one torch thread, after one warm-up
   pass; per-call latency percentiles. Target p99 < 10 ms.
2. overhead: sequential pairs of the same request (raw prompt, greedy, max_tokens 1), once
   through the router's gRPC Generate and once straight to the large worker's Generate, in
   alternating order; TTFT = client-side time to the first chunk carrying a token. Overhead =
   router TTFT - direct TTFT of each pair; reported p50 / p90 of the pair differences. Variants:
   `hint`: tier hint, response cache off (the routing hot path: auth, limits, choice, proxy);
   `hint+cache`: tier hint plus an exact-only cache lookup that misses (LOOKUP_ONLY);
   `auto`: no hint, the classifier picks the tier (a prompt it sends to large). Target: `hint`
   p50 < 3 ms.
3. mixed: N prompts drawn (seeded) from the labelled set, sent through the OpenAI API
   (`openai.AsyncOpenAI`, streaming chat, model "auto", greedy, ignore_eos, max_tokens M, cache
   off) at concurrency C. Per tier that served: client-side TTFT and TPOT percentiles, and
   goodput = share of requests meeting the tier's SLO targets (TTFT and TPOT), client-side and
   as the router's Prometheus counters report it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-bench-000000000"
SLO = {"small": {"ttft_ms": 1500, "tpot_ms": 250}, "quantized": {"ttft_ms": 500, "tpot_ms": 60},
       "large": {"ttft_ms": 500, "tpot_ms": 60}}
OVERHEAD_PROMPT = "Summarize the history of the printing press in two sentences."
AUTO_PROMPT = ("Prove that every group of order 15 is cyclic, and explain each step of the "
               "Sylow argument you use.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"n": len(values), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "max": float(a.max())}


# --- 1. classifier ---------------------------------------------------------------------------

def bench_classifier() -> dict:
    import torch

    torch.set_num_threads(1)
    from services.common.assets import minilm_dir
    from services.router.classifier import DifficultyClassifier, DifficultyModel
    from services.router.classifier.dataset import load_examples
    from services.router.classifier.embedder import ClassifierEmbedder

    model = DifficultyModel.load()
    clf = DifficultyClassifier(model, ClassifierEmbedder(minilm_dir(), model.spec), lru_size=0)
    texts = [e.text for e in load_examples()]
    for t in texts:  # warm-up pass
        clf.score(t)
    times = []
    for t in texts:
        start = time.perf_counter()
        clf.score(t)
        times.append((time.perf_counter() - start) * 1000)
    return {"latency_ms": pct(times), "prompts": len(texts), "spec": {
        "max_tokens": model.spec.max_tokens, "int8": model.spec.int8}}


# --- cluster ---------------------------------------------------------------------------------

class Cluster:
    """Child processes of the benchmark; `stop` ends them all."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, OMP_NUM_THREADS="1", SWITCHYARD_LOG_LEVEL="WARNING",
                        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def spawn(self, args: list[str], name: str) -> subprocess.Popen:
        with open(self.tmp / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    cwd=REPO)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_serving(target: str, timeout_s: float = 180.0) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not SERVING after {timeout_s} s")
            time.sleep(0.2)


def tiny_model(folder: Path, seed: int) -> Path:
    import gguf
    import torch
    import transformers

    from services.common.assets import smollm2_gguf_path
    from services.worker.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf.GGUFReader(smollm2_gguf_path()))
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>"}))
    return folder


def start_cluster(c: Cluster, args: argparse.Namespace) -> dict:
    redis_port, cache_port = free_port(), free_port()
    c.spawn([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port),
             "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(c.tmp)],
            "redis")
    c.spawn([sys.executable, "-m", "services.cache", "--redis-url",
             f"redis://127.0.0.1:{redis_port}/0", "--port", str(cache_port)], "cache")
    models = {"small": "smollm2", "quantized": str(tiny_model(c.tmp / "tiny-2", 2)),
              "large": str(tiny_model(c.tmp / "tiny-1", 1))}
    workers = {}
    for tier, model in models.items():
        port = free_port()
        c.spawn([sys.executable, "-m", "services.worker", "--model", model, "--tier", tier,
                 "--worker-id", f"{tier}-0", "--port", str(port), "--threads", "1",
                 "--max-model-len", "1024", "--num-kv-blocks", "512"], f"worker-{tier}")
        workers[tier] = f"127.0.0.1:{port}"
    grpc_port, http_port = free_port(), free_port()
    config = {"grpc_port": grpc_port, "http_port": http_port,
              "tiers": {t: {"replicas": [a], "slo": SLO[t]} for t, a in workers.items()},
              "tenants": {"bench": {"api_keys": [API_KEY]}},
              "cache": {"target": f"127.0.0.1:{cache_port}", "timeout_ms": 50}}
    (c.tmp / "router.yaml").write_text(yaml.safe_dump(config))
    for target in workers.values():
        wait_serving(target)
    wait_serving(f"127.0.0.1:{cache_port}")
    c.spawn([sys.executable, "-m", "services.router", "--config", str(c.tmp / "router.yaml")],
            "router")
    wait_serving(f"127.0.0.1:{grpc_port}")
    time.sleep(1.0)  # the router's first WatchLoad snapshots
    return {"workers": workers, "router_grpc": f"127.0.0.1:{grpc_port}",
            "router_http": f"http://127.0.0.1:{http_port}"}


# --- 2. overhead -----------------------------------------------------------------------------

def _ttft(stream) -> float:
    start = time.perf_counter()
    first = None
    for msg in stream:
        if first is None and msg.WhichOneof("kind") == "chunk" and msg.chunk.token_ids:
            first = time.perf_counter()
    assert first is not None, "no token"
    return (first - start) * 1000


def bench_overhead(cluster: dict, pairs: int) -> dict:
    router_ch = grpc.insecure_channel(cluster["router_grpc"])
    worker_ch = grpc.insecure_channel(cluster["workers"]["large"])
    router = router_pb2_grpc.RouterServiceStub(router_ch)
    worker = worker_pb2_grpc.WorkerServiceStub(worker_ch)
    md = (("authorization", f"Bearer {API_KEY}"),)
    greedy = common_pb2.SamplingParams(temperature=0.0)
    variants = {
        "hint": (OVERHEAD_PROMPT, common_pb2.TIER_LARGE,
                 common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)),
        "hint+cache": (OVERHEAD_PROMPT, common_pb2.TIER_LARGE,
                       common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_LOOKUP_ONLY,
                                              allow_semantic=False)),
        "auto": (AUTO_PROMPT, common_pb2.TIER_UNSPECIFIED,
                 common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_DISABLED)),
    }
    out = {}
    for name, (prompt, hint, cache) in variants.items():
        def text(i: int, name: str = name, prompt: str = prompt) -> str:
            # `auto`: a new text per pair, so the classifier's LRU never answers for it.
            return f"{prompt} (case {i})" if name == "auto" else prompt

        def rreq(i: int, hint: int = hint, cache=cache) -> router_pb2.GenerateRequest:
            return router_pb2.GenerateRequest(prompt=text(i), max_tokens=1, sampling=greedy,
                                              tier_hint=hint, cache=cache)

        final = list(router.Generate(rreq(-1), metadata=md))[-1].final
        assert final.route.tier == common_pb2.TIER_LARGE, final.route  # same worker as direct

        def direct(i: int, name: str = name) -> float:
            return _ttft(worker.Generate(worker_pb2.GenerateRequest(
                request_id=f"direct-{name}-{i}", prompt=text(i), max_tokens=1,
                sampling=greedy)))

        def routed(i: int) -> float:
            return _ttft(router.Generate(rreq(i), metadata=md))

        for i in range(10):  # warm-up
            routed(-2 - i), direct(-2 - i)
        r_ms, d_ms = [], []
        for i in range(pairs):
            if i % 2:
                d, r = direct(i), routed(i)
            else:
                r, d = routed(i), direct(i)
            r_ms.append(r)
            d_ms.append(d)
        diffs = [r - d for r, d in zip(r_ms, d_ms)]
        out[name] = {"overhead_ms": pct(diffs), "router_ttft_ms": pct(r_ms),
                     "direct_ttft_ms": pct(d_ms)}
    router_ch.close()
    worker_ch.close()
    return out


# --- 3. mixed workload -----------------------------------------------------------------------

async def _one(client, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = last = None
    route = usage = None
    stream = await client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "cache": {"mode": "disabled"}})
    async for event in stream:
        now = time.perf_counter()
        if event.choices and event.choices[0].delta.content:
            first = first or now
            last = now
        if event.choices and event.choices[0].finish_reason:
            route = event.model_extra["switchyard"]
        if event.usage is not None:
            usage = event.usage
    n = usage.completion_tokens
    ttft = (first - start) * 1000
    tpot = (last - first) * 1000 / (n - 1) if n > 1 else None
    return {"tier": route["tier"], "classified": route["classified_tier"], "ttft_ms": ttft,
            "tpot_ms": tpot, "tokens": n, "fallback": route["fallback"]}


async def _mixed(base_url: str, prompts: list[str], concurrency: int, max_tokens: int) -> list:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0,
                                timeout=300)
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[dict] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await _one(client, queue.get_nowait(), max_tokens))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await client.close()
    return results


def _router_goodput(base_url: str) -> dict:
    import httpx2 as httpx

    text = httpx.get(f"{base_url}/metrics").text
    out: dict[str, dict] = {}
    for metric, key in (("switchyard_router_goodput_requests_total", "good"),
                        ("switchyard_router_slo_requests_total", "total")):
        for m in re.finditer(metric + r'\{route="(\w+)",tier="(\w+)"\} ([0-9.e+]+)', text):
            out.setdefault(m.group(2), {"good": 0.0, "total": 0.0})[key] += float(m.group(3))
    return {t: v["good"] / v["total"] for t, v in out.items() if v["total"]}


def bench_mixed(cluster: dict, args: argparse.Namespace) -> dict:
    from services.router.classifier.dataset import load_examples

    rng = random.Random(args.seed)
    prompts = [e.text for e in rng.sample(load_examples(), args.num_requests)]
    start = time.perf_counter()
    results = asyncio.run(_mixed(cluster["router_http"], prompts, args.concurrency,
                                 args.max_tokens))
    duration = time.perf_counter() - start
    router_goodput = _router_goodput(cluster["router_http"])
    tiers = {}
    for tier in ("small", "quantized", "large"):
        rs = [r for r in results if r["tier"] == tier]
        if not rs:
            continue
        slo = SLO[tier]
        good = [r for r in rs if r["ttft_ms"] <= slo["ttft_ms"]
                and (r["tpot_ms"] is None or r["tpot_ms"] <= slo["tpot_ms"])]
        tiers[tier] = {"n": len(rs), "ttft_ms": pct([r["ttft_ms"] for r in rs]),
                       "tpot_ms": pct([r["tpot_ms"] for r in rs if r["tpot_ms"] is not None]),
                       "goodput": len(good) / len(rs), "router_goodput": router_goodput.get(tier),
                       "slo": slo}
    classified = {t: sum(r["classified"] == t for r in results)
                  for t in ("small", "quantized", "large")}
    return {"duration_s": duration, "requests": len(results), "concurrency": args.concurrency,
            "max_tokens": args.max_tokens, "tiers": tiers, "classified": classified,
            "fallbacks": sum(r["fallback"] for r in results)}


# --- report ----------------------------------------------------------------------------------

def report(res: dict) -> None:
    c = res["classifier"]["latency_ms"]
    print(f"\nclassifier ({res['classifier']['prompts']} prompts, int8 MiniLM "
          f"{res['classifier']['spec']['max_tokens']} tokens, 1 thread): "
          f"p50 {c['p50']:.2f} ms  p90 {c['p90']:.2f} ms  p99 {c['p99']:.2f} ms  "
          f"max {c['max']:.2f} ms   (target p99 < 10 ms: {'met' if c['p99'] < 10 else 'MISSED'})")
    if "overhead" in res:
        print("\nrouter overhead = router TTFT - direct TTFT (same request, paired)")
        print("| variant | pairs | overhead p50 ms | overhead p90 ms | router TTFT p50 | "
              "direct TTFT p50 |")
        print("|---|---|---|---|---|---|")
        for name, v in res["overhead"].items():
            o = v["overhead_ms"]
            print(f"| {name} | {o['n']} | {o['p50']:.2f} | {o['p90']:.2f} | "
                  f"{v['router_ttft_ms']['p50']:.2f} | {v['direct_ttft_ms']['p50']:.2f} |")
        hint = res["overhead"]["hint"]["overhead_ms"]["p50"]
        print(f"target: hint p50 < 3 ms: {'met' if hint < 3 else 'MISSED'} ({hint:.2f} ms)")
    if "mixed" in res:
        m = res["mixed"]
        print(f"\nmixed workload through the OpenAI API: {m['requests']} requests, C="
              f"{m['concurrency']}, {m['max_tokens']} output tokens, {m['duration_s']:.1f} s")
        print(f"classifier decisions: {m['classified']}; fallbacks: {m['fallbacks']}")
        print("| tier | N | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | TPOT p90 ms | SLO "
              "(TTFT/TPOT ms) | goodput client | goodput router |")
        print("|---|---|---|---|---|---|---|---|---|")
        for tier, t in m["tiers"].items():
            rg = t["router_goodput"]
            print(f"| {tier} | {t['n']} | {t['ttft_ms']['p50']:.0f} | {t['ttft_ms']['p90']:.0f}"
                  f" | {t['tpot_ms'].get('p50', 0):.1f} | {t['tpot_ms'].get('p90', 0):.1f} | "
                  f"{t['slo']['ttft_ms']}/{t['slo']['tpot_ms']} | {t['goodput']:.0%} | "
                  f"{'-' if rg is None else f'{rg:.0%}'} |")


def run_info(args: argparse.Namespace) -> dict:
    import torch

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=REPO, check=False).stdout.strip()
    return {"args": {k: str(v) for k, v in vars(args).items()}, "git": head,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__,
            "utc": datetime.datetime.now(datetime.UTC).isoformat()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=200, help="overhead pairs per variant")
    p.add_argument("--num-requests", type=int, default=48, help="mixed workload requests")
    p.add_argument("--concurrency", type=int, default=4, help="mixed workload concurrency")
    p.add_argument("--max-tokens", type=int, default=32, help="mixed workload output tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("classifier", "overhead", "mixed"), action="append",
                   help="run only these parts (repeatable)")
    p.add_argument("--json", type=Path, help="write every number and the config here")
    args = p.parse_args(argv)
    parts = set(args.only or ("classifier", "overhead", "mixed"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    res: dict = {"config": run_info(args)}
    res["classifier"] = bench_classifier()
    if parts & {"overhead", "mixed"}:
        with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
            c = Cluster(Path(tmp))
            try:
                cluster = start_cluster(c, args)
                if "overhead" in parts:
                    res["overhead"] = bench_overhead(cluster, args.pairs)
                if "mixed" in parts:
                    res["mixed"] = bench_mixed(cluster, args)
            finally:
                c.stop()
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
