"""CPU float32 linears of one decode step: the native kernel vs oneDNN vs torch's F.linear.

    .venv/bin/python bench/cpu_linear_bench.py --rows 1,8,32,64,512 --json bench/results/linear.json

Times every linear of one model step (30 layers of SmolLM2-135M shapes plus the LM head) with
random weights, one distinct weight per layer, so each step streams all ~540 MB from DRAM as the
engine does (`--hot` reuses layer 0's weights 30 times: the compute-bound ceiling). Prints the
median step time per path and row count, and the native kernel's error against F.linear.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# SmolLM2-135M: qkv (fused), o, gate_up (fused), down; LM head.
LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD_SHAPE = (49152, 576)
NUM_LAYERS = 30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="1,8,32,64,512", help="comma-separated row counts (M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per path and row count")
    p.add_argument("--hot", action="store_true", help="reuse one layer's weights (cache-hot)")
    p.add_argument("--json", type=Path)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from torch import nn

    from services.worker.model.cpu_linear import NativeLinear, OneDnnLinear
    from services.worker.native import linear as native_linear

    torch.set_num_threads(args.threads)
    if not native_linear.available():
        raise SystemExit("the native linear kernel did not build here (see the log)")
    gen = torch.Generator().manual_seed(0)

    def make(n: int, k: int) -> nn.Linear:
        lin = nn.Linear(k, n, bias=False)
        lin.weight.data = torch.randn(n, k, generator=gen) * 0.05
        return lin

    layers = [[make(n, k) for n, k in LAYER_SHAPES] for _ in range(1 if args.hot else NUM_LAYERS)]
    layers = layers * (NUM_LAYERS if args.hot else 1)
    linears = [lin for layer in layers for lin in layer] + [make(*HEAD_SHAPE)]
    paths = {
        "native": [NativeLinear(lin) for lin in linears],
        "onednn": [OneDnnLinear(lin) for lin in linears],
        "f_linear": [lambda x, lin=lin: torch.nn.functional.linear(x, lin.weight)
                     for lin in linears],
    }
    results = []
    print(f"{'rows':>5} {'native ms':>10} {'oneDNN ms':>10} {'F.linear ms':>12} "
          f"{'native GFLOP/s':>15} {'max rel err':>12}")
    with torch.inference_mode():
        for m in [int(r) for r in args.rows.split(",") if r]:
            inputs = {k: torch.randn(m, k, generator=gen) for k in {k for _, k in LAYER_SHAPES}}
            row = {"rows": m}
            for name, fns in paths.items():
                def step() -> None:
                    for fn, lin in zip(fns, linears):
                        fn(inputs[lin.in_features])
                step()  # warm-up
                times = []
                for _ in range(args.repeats if m <= 64 else max(2, args.repeats // 3)):
                    start = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - start)
                row[f"{name}_ms"] = statistics.median(times) * 1e3
            err = 0.0
            for fn, lin in zip(paths["native"][:4] + paths["native"][-1:],
                               linears[:4] + linears[-1:]):
                want = torch.nn.functional.linear(inputs[lin.in_features], lin.weight)
                got = fn(inputs[lin.in_features])
                err = max(err, ((got - want).abs().max() / want.abs().max()).item())
            flops = 2 * m * sum(lin.in_features * lin.out_features for lin in linears)
            row.update(native_gflops=flops / row["native_ms"] / 1e6, max_rel_err=err)
            results.append(row)
            print(f"{m:>5} {row['native_ms']:>10.1f} {row['onednn_ms']:>10.1f} "
                  f"{row['f_linear_ms']:>12.1f} {row['native_gflops']:>15.0f} {err:>12.1e}")
    print(f"panel width {native_linear.panel_width()}, {args.threads} threads,"
          f" {'hot' if args.hot else 'cold'} weights")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "threads": args.threads, "hot": args.hot, "panel_width": native_linear.panel_width(),
            "torch": torch.__version__, "results": results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
