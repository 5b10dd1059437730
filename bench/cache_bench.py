"""Cache benchmark: Lookup latency through gRPC at N entries, and hit / false-hit rates.

    .venv/bin/python bench/cache_bench.py --sizes 10000,100000 --json bench/cache.json

For each size N the script starts its own redis-server (free port, no persistence), bulk-loads
N filler entries into Redis through RedisStore.put_many (the same Lua script as Store), plus the
stored side of every pair in tests/cache/data, then starts `python -m services.cache` against
it (its index rebuild time is read from its log) and times sequential Lookups from this
process over loopback gRPC:
- exact: lookups of random filler entries (exact hits): canonical key, one Redis round trip,
  LRU touch;
- semantic: every paraphrase and near-miss query, twice: exact miss, then the last user turn
  is embedded (the service runs with --embedding-cache-size 0, so every lookup runs the model),
  the whole group is scanned, candidates are fetched and checked by the guard.
Filler entries carry random unit vectors, not embeddings: embedding 100k texts takes ~15 min
on 2 cores, and a brute-force scan costs the same whatever the values. With --groups 1 (the
default, the worst case) every entry is in one semantic group (one tenant, one system prompt),
so each semantic lookup scans all N vectors; --groups G spreads them over G tenants.

Rates: each pair of tests/cache/data/{paraphrases,near_misses}.tsv is stored and looked up in a
scope of its own (one prompt version per pair), through gRPC, with the default threshold.
True-hit rate = paraphrase lookups answered SEMANTIC; false-hit rate = near-miss lookups
answered with any hit.

Targets (2-core CPU, 100k entries): exact p99 < 3 ms, semantic p99 < 20 ms; false-hit rate
< 2% with true-hit rate > 80%. Run on a quiet machine: other load shows in the tails.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2

from services.cache.cache import encode_answer
from services.cache.config import DEFAULT_SIMILARITY_THRESHOLD, CacheConfig
from services.cache.domain import Answer, Message, Query, Role, Sampling, Scope, Usage
from services.cache.keys import query_keys
from services.cache.server import load_embedder
from services.cache.store import Record, RedisStore

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "cache" / "data"
SYSTEM = "You are a helpful assistant."
TARGETS = {"exact": 3.0, "semantic": 20.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_pairs(name: str) -> list[tuple[str, str, str]]:
    lines = [ln for ln in (DATA / name).read_text().splitlines() if ln and ln[0] != "#"]
    return [tuple(ln.split("\t")) for ln in lines[1:]]  # type: ignore[misc]


def domain_query(text: str, tenant: str, prompt_version: str = "") -> Query:
    return Query(Scope(tenant, "", "smollm2", "v1", prompt_version),
                 messages=(Message(Role.SYSTEM, SYSTEM), Message(Role.USER, text)),
                 sampling=Sampling(temperature=0.0), max_tokens=64)


def pb_query(text: str, tenant: str, prompt_version: str = "") -> cache_pb2.CacheQuery:
    return cache_pb2.CacheQuery(
        scope=cache_pb2.CacheScope(tenant=tenant, model_id="smollm2", model_version="v1",
                                   prompt_version=prompt_version),
        chat=common_pb2.Conversation(messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=SYSTEM),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]),
        sampling=common_pb2.SamplingParams(temperature=0.0), max_tokens=64)


def record(text: str, tenant: str, vector: np.ndarray) -> Record:
    q = domain_query(text, tenant)
    k = query_keys(q, CacheConfig().default_temperature)
    ans = Answer(text=f"answer to: {text}", usage=Usage(20, 8, 0), tier=1, model_id="smollm2")
    return Record(k.stop_id, tenant, "v1", "", encode_answer(ans, 64, time.time() * 1000),
                  "S", 8, 64, text, k.group or "", vector.astype(np.float32).tobytes())


def fill(url: str, prefix: str, n: int, groups: int, real: list[tuple[str, np.ndarray]],
         rng: np.random.Generator) -> float:
    """Loads n filler entries plus the `real` (text, vector) ones (tenant-0); returns seconds."""
    store = RedisStore(url, prefix, 5.0, 1.0)
    t0 = time.perf_counter()
    for start in range(0, n, 5000):
        m = min(5000, n - start)
        vecs = rng.standard_normal((m, 384)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        recs = [record(f"benchmark filler question number {i}", f"tenant-{i % groups}", v)
                for i, v in zip(range(start, start + m), vecs)]
        store.put_many(recs, 86_400_000, 10 * n + 1000)
    store.put_many([record(t, "tenant-0", v) for t, v in real], 86_400_000, 10 * n + 1000)
    store.close()
    return time.perf_counter() - t0


class Redis:
    def __init__(self, tmp: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class Service:
    """`python -m services.cache` on a free port; rebuild time parsed from its log."""

    def __init__(self, redis_url: str, prefix: str, log: Path):
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cache", "--redis-url", redis_url, "--port",
             str(self.port), "--key-prefix", prefix, "--max-entries-per-tenant", "10000000",
             "--embedding-cache-size", "0"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
            stderr=open(log, "w"))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(self.channel).result(timeout=300)
        health = health_pb2_grpc.HealthStub(self.channel)
        while health.Check(health_pb2.HealthCheckRequest()).status != 1:
            time.sleep(0.1)
        self.stub = cache_pb2_grpc.CacheServiceStub(self.channel)
        m = re.search(r"index rebuilt from redis: (\d+) vectors in ([\d.]+) s", log.read_text())
        self.rebuild = (int(m.group(1)), float(m.group(2))) if m else (0, float("nan"))

    def stop(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def timed(stub, queries: list[cache_pb2.CacheQuery]) -> tuple[np.ndarray, list[int]]:
    """Sequential Lookups; returns latencies (ms) and result codes."""
    gc.collect()
    gc.freeze()  # keep this process's GC passes over torch's objects out of the timings
    lat, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        resp = stub.Lookup(cache_pb2.LookupRequest(query=q))
        lat.append((time.perf_counter() - t0) * 1000)
        results.append(resp.result)
    return np.array(lat), results


def pair_rates(stub, paraphrases, near_misses) -> dict:
    """Per-pair-scope hit rates through gRPC (see module docstring)."""
    out = {}
    for name, rows in (("paraphrases", paraphrases), ("near_misses", near_misses)):
        hits: dict[str, list[int]] = {}
        for i, (cat, stored, query) in enumerate(rows):
            pv = f"{name}-{i}"
            entry = cache_pb2.CacheEntry(text=stored, finish_reason=common_pb2.FINISH_REASON_STOP,
                                         usage=common_pb2.Usage(completion_tokens=8))
            assert stub.Store(cache_pb2.StoreRequest(query=pb_query(stored, "rates", pv),
                                                     entry=entry)).stored
            r = stub.Lookup(cache_pb2.LookupRequest(query=pb_query(query, "rates", pv))).result
            hits.setdefault(cat, []).append(r in (common_pb2.CACHE_RESULT_EXACT,
                                                  common_pb2.CACHE_RESULT_SEMANTIC))
        total = [h for v in hits.values() for h in v]
        out[name] = {"n": len(total), "hits": int(sum(total)), "rate": sum(total) / len(total),
                     "by_category": {c: [int(sum(v)), len(v)] for c, v in hits.items()}}
    return out


def run_size(n: int, args, real, sem_queries, pairs, tmp: Path) -> dict:
    redis = Redis(tmp)
    try:
        rng = np.random.default_rng(args.seed + n)
        prefix = f"bench{n}:"
        fill_s = fill(redis.url, prefix, n, args.groups, real, rng)
        svc = Service(redis.url, prefix, tmp / f"service-{n}.log")
        try:
            idx = rng.choice(n, size=min(args.exact_lookups, n), replace=False)
            exact_qs = [pb_query(f"benchmark filler question number {i}",
                                 f"tenant-{i % args.groups}") for i in idx]
            timed(svc.stub, exact_qs[:50] + sem_queries[:20])  # warm-up
            ex_lat, ex_res = timed(svc.stub, exact_qs)
            sem_lat, sem_res = timed(svc.stub, sem_queries * args.semantic_rounds)
            first = n == args.sizes[0]
            rates = pair_rates(svc.stub, *pairs) if args.rates and first else None
        finally:
            svc.stop()
    finally:
        redis.stop()
    group = n // args.groups + (n % args.groups > 0) + len(real)
    row = {"entries": n, "groups": args.groups, "largest_group": group, "fill_s": fill_s,
           "rebuild_vectors": svc.rebuild[0], "rebuild_s": svc.rebuild[1]}
    for kind, lat, res in (("exact", ex_lat, ex_res), ("semantic", sem_lat, sem_res)):
        row[kind] = {"n": len(lat), "p50_ms": float(np.percentile(lat, 50)),
                     "p90_ms": float(np.percentile(lat, 90)),
                     "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
                     "results": {common_pb2.CacheResult.Name(r): res.count(r) for r in set(res)}}
    row["rates"] = rates
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000", help="entry counts, comma-separated")
    p.add_argument("--groups", type=int, default=1, help="spread entries over G tenants")
    p.add_argument("--exact-lookups", type=int, default=2000)
    p.add_argument("--semantic-rounds", type=int, default=2,
                   help="passes over the 296 semantic queries")
    p.add_argument("--no-rates", dest="rates", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(1)

    paraphrases, near = read_pairs("paraphrases.tsv"), read_pairs("near_misses.tsv")
    embedder = load_embedder(CacheConfig())
    stored = [r[1] for r in paraphrases + near]
    vecs = np.concatenate([embedder.embed(stored[i : i + 64]) for i in range(0, len(stored), 64)])
    real = list(zip(stored, vecs))
    sem_queries = [pb_query(r[2], "tenant-0") for r in paraphrases + near]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rows.append(run_size(n, args, real, sem_queries, (paraphrases, near), Path(tmp)))
            print_row(rows[-1])
    report(rows, args)


def print_row(row: dict) -> None:
    print(f"\n{row['entries']} entries (largest semantic group {row['largest_group']}): "
          f"fill {row['fill_s']:.1f} s, index rebuild {row['rebuild_vectors']} vectors in "
          f"{row['rebuild_s']:.2f} s", flush=True)


def report(rows: list[dict], args) -> None:
    print(f"\n{'entries':>8} {'kind':>9} {'n':>5} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
          f"{'target p99':>10}  results")
    for row in rows:
        for kind in ("exact", "semantic"):
            r = row[kind]
            ok = "ok" if r["p99_ms"] < TARGETS[kind] else "MISSED"
            print(f"{row['entries']:>8} {kind:>9} {r['n']:>5} {r['p50_ms']:>7.2f} "
                  f"{r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} {f'< {TARGETS[kind]:g} {ok}':>10}"
                  f"  {r['results']}")
    rates = next((r["rates"] for r in rows if r["rates"]), None)
    if rates:
        th, fh = rates["paraphrases"], rates["near_misses"]
        print(f"\nthreshold {DEFAULT_SIMILARITY_THRESHOLD}: true-hit {th['rate']:.1%} "
              f"({th['hits']}/{th['n']}, target > 80%), false-hit {fh['rate']:.1%} "
              f"({fh['hits']}/{fh['n']}, target < 2%)")
        print("  near-miss hits by category:", fh["by_category"])
    if args.json:
        meta = {"argv": sys.argv, "python": platform.python_version(),
                "torch": torch.__version__, "cpus": os.cpu_count(),
                "utc": datetime.datetime.now(datetime.UTC).isoformat(),
                "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO,
                                      capture_output=True, text=True).stdout.strip()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
