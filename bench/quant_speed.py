"""Decode speed of the quantized tiers against float32 on this CPU, measured in one run.

    .venv/bin/python bench/quant_speed.py --json bench/quant_speed.json       # batch-1 decode
    .venv/bin/python bench/quant_speed.py --batch 1,8,32 --rounds 3           # also batched
    .venv/bin/python bench/quant_speed.py --rows 1,4,16,32,64                 # linear layers only

Decode: one in-process `LLMEngine` per variant (the worker's engine: scheduler, model runner,
attention backend, sampler), all loaded up front. Each round runs every variant once, in a
rotated order, on the same requests: B greedy requests of a `--prompt-tokens` prompt (Python's
help text) generating `--new-tokens` tokens each; the steps after the batch's first token are
timed. Reported: the median step over all rounds, tokens/s = B / step, and the ratio to float32.
Interleaving matters on a shared machine, where minute-to-minute speed varies by ~15%.

int8 loads with round-to-nearest here (`--int8-method`): GPTQ, the worker's default, changes
which integers are stored, not the format or the kernel, and takes ~1 minute to load.

--rows: the linear layers of one SmolLM2 decoder layer plus the LM head at M rows, float32
(oneDNN-packed) against each quantized format's two CPU paths (torch's packed weight-only kernel
and dequantize + GEMM): the crossovers behind each format's `small_m` (quant/int8.py, int4.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from quant_models import Variant, load_variant, variants, weight_bytes  # noqa: E402

from services.common.assets import smollm2_gguf_path  # noqa: E402
from services.worker.quant.config import QuantConfig  # noqa: E402


def decode_steps(engine, prompt: list[int], batch: int, new_tokens: int, tag: str) -> list[float]:
    """Step times (s) once every request of the batch has its first token."""
    from services.worker.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", prompt, params)
    started: set[str] = set()
    times = []
    while engine.has_unfinished:
        t0 = time.perf_counter()
        events = engine.step()
        dt = time.perf_counter() - t0
        if len(started) == batch:
            times.append(dt)
        started.update(e.request_id for e in events if e.token_ids)
    return times


def run_decode(args, table: dict[str, Variant], prompt: list[int]) -> dict:
    from services.worker.engine.config import CacheConfig, SchedulerConfig
    from services.worker.engine.engine import LLMEngine

    path = smollm2_gguf_path()
    engines = {}
    for name, v in table.items():
        loaded = load_variant(v, path, with_tokenizer=True)
        engines[name] = LLMEngine(loaded, CacheConfig(num_blocks=64 * max(args.batch)),
                                  SchedulerConfig(max_model_len=2048))
        print(f"loaded {name}: {weight_bytes(loaded.model) / 2**20:.0f} MB of weights, "
              f"{loaded.load_seconds:.1f} s", flush=True)
    names = list(engines)
    results = {}
    for batch in args.batch:
        samples = {n: [] for n in names}
        for n in names:  # warm-up: allocator, oneDNN primitives, first-call paths
            decode_steps(engines[n], prompt, batch, 4, f"warm{batch}")
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                samples[n] += decode_steps(engines[n], prompt, batch, args.new_tokens,
                                           f"r{r}b{batch}")
        base = statistics.median(samples[names[0]])
        for n in names:
            step = statistics.median(samples[n])
            results[f"{n}@{batch}"] = {"variant": n, "batch": batch, "step_ms": step * 1e3,
                                       "tokens_per_s": batch / step, "vs_first": base / step,
                                       "steps": len(samples[n])}
    return results


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.inference_mode()
def run_rows(args) -> dict:
    """Linear layers only: float32 packed vs each quantized format's two CPU paths."""
    from services.worker.model.cpu_linear import packed_linear_class
    from services.worker.quant.int4 import Int4Linear
    from services.worker.quant.int8 import Int8Linear

    gen = torch.Generator().manual_seed(0)
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # qkv o gu down head
    layers, packed = [], packed_linear_class()
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.05
        lin = torch.nn.Linear(k, n, bias=False)
        lin.weight.data = w
        layers.append((k, packed(lin), Int8Linear.from_float(w), Int4Linear.from_float(w)))
    out = {}
    print(f"{'rows':>5} {'part':<6}{'float32':>9}{'int8 kern':>11}{'int8 deq':>10}"
          f"{'int4 kern':>11}{'int4 deq':>10}   (ms)")
    paths = {
        "float32": lambda f, q8, q4, x: f(x),
        "int8_kernel": lambda f, q8, q4, x: q8._cpu_small_matmul(x),
        "int8_dequant": lambda f, q8, q4, x: torch.nn.functional.linear(x, q8.dequantize()),
        "int4_kernel": lambda f, q8, q4, x: q4._cpu_small_matmul(x),
        "int4_dequant": lambda f, q8, q4, x: torch.nn.functional.linear(x, q4.dequantize()),
    }
    for m in args.rows:
        for part, group in (("layer", layers[:4]), ("head", layers[4:])):
            row = {}
            for name, fn in paths.items():
                row[name] = 1e3 * sum(
                    _time(lambda: fn(f, q8, q4, x), args.repeats)
                    for k, f, q8, q4 in group for x in [torch.randn(m, k, generator=gen)])
            out[f"{m}/{part}"] = row
            print(f"{m:>5} {part:<6}" + "".join(f"{row[c]:>{w}.2f}" for c, w in
                                                zip(row, (9, 11, 10, 11, 10))), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default="float32,int8,int4",
                   help="comma-separated; the first is the baseline")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--int8-method", default="rtn", choices=("rtn", "gptq"))
    p.add_argument("--rows", default="", help="linear-layer mode: comma-separated row counts")
    p.add_argument("--repeats", type=int, default=20, help="--rows: timings per median")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    info = {"args": vars(args) | {"json": str(args.json)}, "torch": torch.__version__,
            "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if args.rows:
        args.rows = [int(r) for r in args.rows.split(",")]
        info["rows"] = run_rows(args)
    else:
        args.batch = [int(b) for b in args.batch.split(",")]
        all_variants = variants()
        table = {}
        for n in args.variants.split(","):
            v = all_variants[n]
            if v.quant.scheme == "int8":
                v = Variant(n, v.dtype, QuantConfig("int8", int8_method=args.int8_method))
            table[n] = v
        from pydoc_data.topics import topics

        first = load_variant(table[next(iter(table))], smollm2_gguf_path(), with_tokenizer=True)
        text = "\n\n".join(topics[k] for k in sorted(topics))
        prompt = first.tokenizer.encode(text, add_special_tokens=False)[:args.prompt_tokens]
        del first
        res = run_decode(args, table, prompt)
        info["decode"] = res
        base = next(iter(table))
        print(f"\nSmolLM2-135M decode, {args.prompt_tokens}-token prompt, {args.new_tokens} new "
              f"tokens, {args.rounds} interleaved rounds, {args.threads} threads")
        print(f"{'variant':<10}{'batch':>6}{'step ms':>9}{'tok/s':>8}{f'vs {base}':>12}")
        for r in res.values():
            print(f"{r['variant']:<10}{r['batch']:>6}{r['step_ms']:>9.2f}{r['tokens_per_s']:>8.1f}"
                  f"{r['vs_first']:>11.2f}x")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
