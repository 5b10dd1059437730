"""Worker benchmark: N seeded requests at concurrency C over gRPC; prints a table, writes JSON.

    .venv/bin/python bench/worker_bench.py --workload all --compare-naive --json bench/results.json

Starts its own worker (or uses `--target`), sends raw-text prompts of seeded lengths with greedy
sampling and `ignore_eos`, so every request yields exactly the workload's output length. `--naive`
serves the same model one request at a time (`--max-num-seqs 1`); `--compare-naive` runs both
and prints the speedup. `--bare` times the engine's own batch-1 decode step in-process.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import numpy as np
from switchyard.common.v1 import common_pb2
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

# Run as a script: bench/ is sys.path[0].
from prompts import WORKLOADS, Prompt, PromptFactory, prompt_lengths
from services.common.assets import smollm2_gguf_path
from services.worker.client import wait_serving
from services.worker.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
PCTS = (50, 95, 99)


@dataclasses.dataclass
class Record:
    """One request as the client saw it (perf_counter seconds) plus the worker's own report."""

    sent: float
    token_times: list[float]
    """Arrival time of each output token (tokens of one chunk share a time)."""
    prompt_tokens: int
    """As the worker counted them (usage.prompt_tokens)."""
    target_tokens: int
    timings: common_pb2.Timings


def model_path(model: str) -> Path:
    return smollm2_gguf_path() if model == "smollm2" else Path(model)


# ----- worker process ---------------------------------------------------------------------------

@contextmanager
def worker(args: argparse.Namespace, mode: str):
    """Yields HOST:PORT of a SERVING worker: `--target`, or a subprocess stopped with SIGTERM."""
    if args.target:
        wait_for(args.target, 30)
        yield args.target
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    cmd = [sys.executable, "-m", "services.worker", "--model", args.model, "--tier", "small",
           "--port", "0", "--threads", str(args.threads)]
    cmd += ["--max-num-seqs", "1"] if mode == "naive" else []
    log = tempfile.NamedTemporaryFile("w", prefix=f"worker-{mode}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        match = re.search(r"listening on \S+:(\d+)", proc.stdout.readline())
        if match is None:
            raise RuntimeError(f"worker did not start; see {log.name}")
        target = f"127.0.0.1:{match[1]}"
        wait_for(target, 120)
        yield target
    except BaseException:
        print(f"worker log: {log.name}", file=sys.stderr)
        raise
    else:
        os.unlink(log.name)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def wait_for(target: str, timeout_s: float) -> None:
    with grpc.insecure_channel(target) as channel:
        wait_serving(channel, timeout_s)


# ----- load generation --------------------------------------------------------------------------

async def generate(stub, prompt: Prompt, max_tokens: int) -> Record:
    req = worker_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex, prompt=prompt.text, max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True))
    sent = time.perf_counter()
    token_times: list[float] = []
    complete = None
    async for resp in stub.Generate(req):
        now = time.perf_counter()
        kind = resp.WhichOneof("kind")
        if kind == "chunk":
            token_times.extend([now] * len(resp.chunk.token_ids))
        elif kind == "complete":
            complete = resp.complete
        else:
            raise RuntimeError(f"request failed: {resp.error.message}")
    if complete is None or len(token_times) != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens and a Complete, got {len(token_times)}")
    return Record(sent, token_times, complete.usage.prompt_tokens,
                  prompt.target_tokens, complete.timings)


async def run_load(target: str, prompts: list[Prompt], max_tokens: int,
                   concurrency: int) -> tuple[list[Record], float]:
    """C coroutines pull from one queue of requests over one channel; returns records, seconds."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        pending = iter(prompts)  # the shared queue: each coroutine takes the next request
        records: list[Record] = []

        async def client() -> None:
            for prompt in pending:
                records.append(await generate(stub, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return records, time.perf_counter() - start


def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in PCTS}
    return {f"p{p}": float(np.percentile(values, p)) for p in PCTS}


def summarize(records: list[Record], duration: float) -> dict:
    out_tokens = sum(len(r.token_times) for r in records)
    prompt_tokens = [r.prompt_tokens for r in records]
    ttft = [(r.token_times[0] - r.sent) * 1e3 for r in records]
    tpot = [(r.token_times[-1] - r.token_times[0]) * 1e3 / (len(r.token_times) - 1)
            for r in records if len(r.token_times) > 1]
    itl = [(b - a) * 1e3 for r in records for a, b in zip(r.token_times, r.token_times[1:])]
    total_ms = sum(r.timings.total_ms for r in records) or float("nan")
    return {
        "requests": len(records), "duration_s": duration,
        "output_tok_s": out_tokens / duration,
        "total_tok_s": (out_tokens + sum(prompt_tokens)) / duration,
        "req_s": len(records) / duration,
        "ttft_ms": pct(ttft), "tpot_ms": pct(tpot), "itl_ms": pct(itl),
        "queue_ms_mean": float(np.mean([r.timings.queue_ms for r in records])),
        # Worker-measured: share of request latency before the first token (queue + prefill) ...
        "pre_first_token_share": sum(r.timings.ttft_ms for r in records) / total_ms,
        # ... and the same without the queue wait (admission to first token).
        "prefill_share": sum(r.timings.ttft_ms - r.timings.queue_ms for r in records) / total_ms,
        "prompt_tokens": {"mean": float(np.mean(prompt_tokens)), "min": min(prompt_tokens),
                          "max": max(prompt_tokens),
                          "max_abs_error": max(abs(r.prompt_tokens - r.target_tokens)
                                               for r in records)},
    }


# ----- bare batch-1 step ------------------------------------------------------------------------

def measure_bare(args: argparse.Namespace, prompt_ids: list[int], repeats: int = 64) -> dict:
    """Median batch-1 decode step of an in-process LLMEngine, and of the model forward alone."""
    import torch

    from services.worker.engine.config import CacheConfig, SchedulerConfig
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.sampling_params import SamplingParams
    from services.worker.model.attention import AttentionMetadata, forward_context, get_backend
    from services.worker.model.loader import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(model_path(args.model))
    engine = LLMEngine(loaded, CacheConfig(num_blocks=256), SchedulerConfig(max_model_len=2048))
    params = SamplingParams(temperature=0.0, max_tokens=repeats + 1, ignore_eos=True)
    for request_id in ("warmup", "bare"):  # the second run is the measured one
        engine.add_request(request_id, prompt_ids, params)
        step_s, first_token_seen = [], False
        while engine.has_unfinished:
            start = time.perf_counter()
            events = engine.step()
            if first_token_seen:
                step_s.append(time.perf_counter() - start)
            first_token_seen = first_token_seen or any(e.token_ids for e in events)

    # One decode token through the model and LM head, no scheduler or sampler.
    model, bs = loaded.model, engine.runner.block_size
    ctx = len(prompt_ids) + repeats
    meta = AttentionMetadata(
        query_start_loc=[0, 1], seq_lens=[ctx],
        slot_mapping=torch.tensor([ctx - 1]),  # identity block table below: slot = position
        block_tables=torch.tensor([list(range(-(-ctx // bs)))]),
        kv_caches=engine.runner.kv_caches,
        backend=get_backend(engine.runner.attention_backend))  # the engine's attention path
    ids, positions = torch.tensor([prompt_ids[0]]), torch.tensor([ctx - 1])
    forward_s = []
    with torch.inference_mode():
        for i in range(repeats + 8):
            start = time.perf_counter()
            with forward_context(meta):
                model.compute_logits(model(ids, positions))  # [1, vocab]
            if i >= 8:
                forward_s.append(time.perf_counter() - start)
    return {"prompt_tokens": len(prompt_ids), "decode_steps": len(step_s),
            "engine_step_ms_p50": float(np.median(step_s) * 1e3),
            "model_forward_ms_p50": float(np.median(forward_s) * 1e3)}


# ----- report ---------------------------------------------------------------------------------

COLUMNS = ("workload", "mode", "C", "N", "dur_s", "out_tok/s", "tot_tok/s", "req/s", "TTFT p50",
           "p95", "p99", "TPOT p50", "p95", "p99", "queue_ms", "pre1st%", "prefill%")
WIDTHS = (13, 7, 3, 4, 7, 9, 9, 6, 9, 8, 8, 8, 7, 7, 8, 7, 8)


def table_row(cells) -> str:
    return " ".join(str(c).rjust(w) for c, w in zip(cells, WIDTHS))


def format_row(r: dict) -> str:
    t, p = r["ttft_ms"], r["tpot_ms"]
    return table_row((r["workload"], r["mode"], r["concurrency"], r["requests"],
                      f"{r['duration_s']:.1f}", f"{r['output_tok_s']:.1f}",
                      f"{r['total_tok_s']:.1f}", f"{r['req_s']:.2f}",
                      *(f"{t[f'p{q}']:.0f}" for q in PCTS), *(f"{p[f'p{q}']:.1f}" for q in PCTS),
                      f"{r['queue_ms_mean']:.0f}", f"{100 * r['pre_first_token_share']:.1f}",
                      f"{100 * r['prefill_share']:.1f}"))


def speedups(results: list[dict]) -> list[dict]:
    """batched / naive output tok/s per (workload, C, repeat), each pair measured back to back."""
    by_key = {(r["workload"], r["concurrency"], r.get("repeat", 0), r["mode"]): r
              for r in results}
    return [{"workload": w, "concurrency": c, "repeat": k,
             "speedup": r["output_tok_s"] / by_key[(w, c, k, "naive")]["output_tok_s"]}
            for (w, c, k, mode), r in by_key.items()
            if mode == "batched" and (w, c, k, "naive") in by_key]


def speedup_summary(gains: list[dict]) -> list[dict]:
    """Median, min and max of the per-repeat speedups for each (workload, C)."""
    groups: dict[tuple, list[float]] = {}
    for g in gains:
        groups.setdefault((g["workload"], g["concurrency"]), []).append(g["speedup"])
    return [{"workload": w, "concurrency": c, "repeats": len(v), "median": float(np.median(v)),
             "min": min(v), "max": max(v)} for (w, c), v in groups.items()]


def run_info(args: argparse.Namespace) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"args": vars(args), "git_commit": commit, "threads": args.threads,
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "machine": platform.machine(), "python": platform.python_version(),
            "torch": importlib.metadata.version("torch"),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat()}


# ----- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="all", choices=(*WORKLOADS, "all"))
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--num-requests", type=int, help="per run (default: max(4, C))")
    p.add_argument("--naive-num-requests", type=int,
                   help="cap for naive runs, the first K of the same prompts (default: 8)")
    p.add_argument("--output-tokens", type=int, help="override the workload's output length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-prefix-tokens", type=int, default=0,
                   help="prepend the same K-token prefix to every prompt (tests prefix caching)")
    p.add_argument("--target", help="HOST:PORT of a running worker (else start one)")
    p.add_argument("--model", default="smollm2", help="worker --model (and the prompt tokenizer)")
    p.add_argument("--threads", type=int, default=2, help="worker torch threads (and --bare's)")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default=None,
                   help="OMP_WAIT_POLICY for the worker; unset (spin, then sleep) is fastest when "
                   "the worker has the cores to itself: 136 vs 93 tok/s at 2 threads, C=32")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--naive", action="store_true", help="one request at a time, no batching")
    mode.add_argument("--compare-naive", action="store_true", help="batched and naive, speedup")
    p.add_argument("--bare", action=argparse.BooleanOptionalAction,
                   help="time the bare batch-1 decode step (default: on for --workload all)")
    p.add_argument("--bare-only", action="store_true", help="only the bare measurement")
    p.add_argument("--repeats", type=int, default=1,
                   help="run the whole plan R times; speedups are reported per repeat and as "
                   "their median")
    p.add_argument("--json", type=Path, help="write every number and the config here")
    args = p.parse_args(argv)
    if args.target and args.compare_naive:
        p.error("--compare-naive starts its own workers; drop --target")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    if args.bare is None:
        args.bare = args.workload == "all"
    return args


def make_plan(args: argparse.Namespace, factory: PromptFactory) -> list[tuple]:
    """(workload, concurrency, prompts) per run; built once, so both modes see the same prompts."""
    workloads = [] if args.bare_only else (
        list(WORKLOADS.values()) if args.workload == "all" else [WORKLOADS[args.workload]])
    if args.output_tokens:
        workloads = [dataclasses.replace(w, output_tokens=args.output_tokens) for w in workloads]
    return [(w, c, [factory.make(k) for k in
                    prompt_lengths(w, args.num_requests or max(4, c), args.seed)])
            for w in workloads for c in args.concurrency]


def run_modes(args: argparse.Namespace, plans: list[list[tuple]],
              warmup: list[Prompt]) -> list[dict]:
    """Runs one plan per repeat (fresh prompts each time, so a repeat gets no prefix-cache hits
    from the one before; same lengths). With --compare-naive both workers stay up (an idle one
    blocks on its command queue and costs no CPU) and each (workload, C) runs in both modes back
    to back, alternating which goes first: slow drift of the machine (another tenant, clock
    changes) then falls on both sides instead of biasing the speedup."""
    modes = ["batched", "naive"] if args.compare_naive else ["naive" if args.naive else "batched"]
    results = []
    if not plans[0]:
        return results
    with ExitStack() as stack:
        targets = {mode: stack.enter_context(worker(args, mode)) for mode in modes}
        for target in targets.values():  # first-call costs of each prompt size stay out
            asyncio.run(run_load(target, warmup, 8, len(warmup)))
        turn = 0
        for repeat, plan in enumerate(plans):
            for w, c, prompts in plan:
                order = modes if turn % 2 == 0 else modes[::-1]
                turn += 1
                for mode in order:
                    # Served one at a time, naive throughput does not depend on N.
                    run = prompts[:args.naive_num_requests or 8] if mode == "naive" else prompts
                    records, duration = asyncio.run(
                        run_load(targets[mode], run, w.output_tokens, c))
                    results.append({"workload": w.name, "mode": mode, "concurrency": c,
                                    "repeat": repeat, "output_tokens": w.output_tokens,
                                    **summarize(records, duration)})
                    print(f"  [{repeat}] {mode} {w.name} C={c}: {duration:.1f} s",
                          file=sys.stderr, flush=True)
    return results


def report(args: argparse.Namespace, bare: dict | None, results: list[dict]) -> None:
    if results:
        print(table_row(COLUMNS))
        for r in sorted(results, key=lambda r: (r["workload"], r["concurrency"], r["repeat"],
                                                r["mode"])):
            print(format_row(r))
    gains = speedups(results)
    summary = speedup_summary(gains)
    for s in summary:
        spread = (f" (median of {s['repeats']}; min {s['min']:.2f}x, max {s['max']:.2f}x)"
                  if s["repeats"] > 1 else "")
        print(f"speedup {s['workload']} C={s['concurrency']}: output tok/s batched / naive = "
              f"{s['median']:.2f}x{spread}")
    ratios = [{"workload": r["workload"], "mode": r["mode"],
               "tpot_over_engine_step": r["tpot_ms"]["p50"] / bare["engine_step_ms_p50"],
               "tpot_over_model_forward": r["tpot_ms"]["p50"] / bare["model_forward_ms_p50"]}
              for r in results if bare and r["concurrency"] == 1]
    for q in ratios:
        print(f"TPOT(c=1) p50 / bare step, {q['workload']} {q['mode']}: "
              f"{q['tpot_over_engine_step']:.2f} (engine step), "
              f"{q['tpot_over_model_forward']:.2f} (model forward)")
    if args.json:
        out = {"config": run_info(args), "bare": bare, "results": results, "speedup": gains,
               "speedup_summary": summary,
               "tpot_over_bare": ratios}
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(OMP_NUM_THREADS=str(args.threads))  # before torch
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    path = model_path(args.model)
    tokenizer = Tokenizer.from_hf_dir(path) if path.is_dir() else Tokenizer.from_gguf_file(path)
    factory = PromptFactory(tokenizer, args.shared_prefix_tokens)
    bare = measure_bare(args, factory.take_ids(128)) if args.bare or args.bare_only else None
    if bare:
        print(f"bare batch-1 decode ({bare['prompt_tokens']}-token prompt, {args.threads} threads):"
              f" engine step {bare['engine_step_ms_p50']:.2f} ms,"
              f" model forward {bare['model_forward_ms_p50']:.2f} ms (medians)", flush=True)
    plans = [make_plan(args, factory) for _ in range(args.repeats)]
    warmup = [factory.make(n) for n in (32, 128, 256, 512, 700)]
    report(args, bare, run_modes(args, plans, warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
