"""Where an engine step goes: an in-process LLMEngine on a seeded workload, each part timed.

Runs C requests of the workload (the same seeded prompts as `worker_bench.py`), greedy, and
splits the wall time of the prefill phase (until every request has its first token) and of the
decode steps after it into parts: linears, LM head, attention kernel, KV write, RMSNorm, RoPE,
SwiGLU, embedding, sampler, scheduler, input preparation, and the rest ("other": Python glue
and op dispatch). Each part is timed exclusively (a wrapped call's time minus the wrapped calls
inside it), so the parts sum to the phase's wall time.

    .venv/bin/python bench/step_profile.py --workload decode-heavy --concurrency 32 \
        --decode-steps 64 [--json bench/results/step_profile.json]

Timing adds a perf_counter pair per wrapped call (~300 calls a step); `--no-parts` times whole
steps only, to compare against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prompts import WORKLOADS, PromptFactory, prompt_lengths  # noqa: E402


class PartTimer:
    """Wraps callables so that each call's exclusive time is added to its part's total."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []  # time spent in wrapped children, per open call

    def wrap(self, owner, name: str, part: str) -> None:
        inner = getattr(owner, name)
        timer = self

        def timed(*args, **kwargs):
            timer._stack.append(0.0)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                children = timer._stack.pop()
                timer.totals[part] += elapsed - children
                if timer._stack:
                    timer._stack[-1] += elapsed

        if isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod):
            timed = staticmethod(timed)
        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


def instrument(engine, timer: PartTimer) -> None:
    import torch

    from services.worker.engine import model_runner
    from services.worker.model import cpu_attention, layers, rope
    from services.worker.model.cpu_linear import NativeLinear, OneDnnLinear

    model = engine.runner.model
    head = model.lm_head
    timer.wrap(head, "forward", "lm_head")  # instance attribute: wins over the class wrapper
    for cls in (NativeLinear, OneDnnLinear, torch.nn.Linear):
        timer.wrap(cls, "forward", "linears")
    timer.wrap(layers.RMSNorm, "forward", "rmsnorm")
    timer.wrap(layers.SiluAndMul, "forward", "swiglu")
    timer.wrap(rope.RotaryEmbedding, "rotate_qk", "rope")
    timer.wrap(rope.RotaryEmbedding, "lookup", "rope")
    timer.wrap(model.model.embed_tokens, "forward", "embedding")
    backend = engine.runner.attention_backend
    for cls in (cpu_attention.CpuAttention, cpu_attention.TorchAttention):
        timer.wrap(cls, "__call__", f"attention ({backend})")
        timer.wrap(cls, "write_kv", "kv write")
    timer.wrap(model_runner.sampler, "prepare", "sampler")
    timer.wrap(model_runner.sampler, "sample", "sampler")
    timer.wrap(engine.runner, "_prepare", "prepare inputs")
    timer.wrap(engine.scheduler, "schedule", "scheduler")


def run(args: argparse.Namespace) -> dict:
    import torch

    from services.worker.engine.config import CacheConfig, SchedulerConfig
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.sampling_params import SamplingParams
    from services.worker.model.loader import load_model
    from worker_bench import model_path

    torch.set_num_threads(args.threads)
    loaded = load_model(model_path(args.model))
    engine = LLMEngine(loaded, CacheConfig(num_blocks=args.num_blocks),
                       SchedulerConfig(max_num_seqs=max(32, args.concurrency),
                                       max_model_len=2048))
    workload = WORKLOADS[args.workload]
    factory = PromptFactory(loaded.tokenizer)
    lengths = prompt_lengths(workload, args.concurrency, args.seed)
    prompts = [loaded.tokenizer.encode(factory.make(n).text) for n in lengths]
    # Room to spare: requests get their first token in different prefill steps, and none may
    # finish inside the timed decode steps (a shrinking batch would flatter the step time).
    params = SamplingParams(temperature=0.0, max_tokens=2 * args.decode_steps + 64,
                            ignore_eos=True)

    # Warm-up: one short request through prefill and a few decodes (first-call costs).
    engine.add_request("warmup", prompts[0][:32], SamplingParams(temperature=0.0, max_tokens=4))
    while engine.has_unfinished:
        engine.step()

    timer = PartTimer()
    if args.parts:
        instrument(engine, timer)
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    started: set[str] = set()
    prefill_steps, start = 0, time.perf_counter()
    while len(started) < len(prompts):
        for event in engine.step():
            if event.token_ids:
                started.add(event.request_id)
        prefill_steps += 1
    prefill_s = time.perf_counter() - start
    prefill_parts = timer.take()

    step_s = []
    for _ in range(args.decode_steps):
        start = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - start)
    decode_parts = timer.take()
    engine.abort_all()
    return {
        "workload": args.workload, "concurrency": args.concurrency, "threads": args.threads,
        "attention_backend": engine.runner.attention_backend,
        "prompt_tokens": sum(map(len, prompts)),
        "prefill": {"steps": prefill_steps, "wall_s": prefill_s, "parts_s": prefill_parts},
        "decode": {"steps": len(step_s), "wall_s": sum(step_s),
                   "step_ms_p50": statistics.median(step_s) * 1e3,
                   "step_ms_min": min(step_s) * 1e3, "parts_s": decode_parts,
                   "step_ms": [round(s * 1e3, 2) for s in step_s]},
    }


def print_report(r: dict) -> None:
    pre, dec = r["prefill"], r["decode"]
    print(f"{r['workload']} C={r['concurrency']} threads={r['threads']} "
          f"attention={r['attention_backend']} prompt tokens={r['prompt_tokens']}")
    print(f"prefill phase: {pre['steps']} steps, {pre['wall_s']:.2f} s; decode: {dec['steps']} "
          f"steps, p50 {dec['step_ms_p50']:.1f} ms, min {dec['step_ms_min']:.1f} ms")
    if not dec["parts_s"]:
        return
    print(f"{'part':<22}{'prefill s':>10}{'%':>6}{'decode ms/step':>16}{'%':>6}")
    parts = sorted(set(pre["parts_s"]) | set(dec["parts_s"]),
                   key=lambda p: -dec["parts_s"].get(p, 0.0))
    rows = [(p, pre["parts_s"].get(p, 0.0), dec["parts_s"].get(p, 0.0)) for p in parts]
    rows.append(("other", pre["wall_s"] - sum(pre["parts_s"].values()),
                 dec["wall_s"] - sum(dec["parts_s"].values())))
    for name, p, d in rows:
        print(f"{name:<22}{p:>10.3f}{100 * p / pre['wall_s']:>6.1f}"
              f"{d * 1e3 / dec['steps']:>16.2f}{100 * d / dec['wall_s']:>6.1f}")
    print(f"{'total':<22}{pre['wall_s']:>10.3f}{100.0:>6.1f}"
          f"{dec['wall_s'] * 1e3 / dec['steps']:>16.2f}{100.0:>6.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="decode-heavy", choices=tuple(WORKLOADS))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-blocks", type=int, default=2048)
    p.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                   help="time each part (default) or whole steps only")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    result = run(args)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
