"""CPU float32 paged attention: the native kernel against the torch path (gather + SDPA).

    .venv/bin/python bench/cpu_attention_bench.py --json bench/results/cpu_attention.json

Two shapes of SmolLM2-135M (9 query heads over 3 KV heads, head_dim 64, 16-token blocks):
- decode: one step of B sequences (contexts drawn like the decode-heavy workload mid-run,
  32-256 prompt + 0-256 generated tokens), all 30 layers, each layer's K/V in its own slice of
  a pool far larger than the caches, blocks scattered as a long-running pool leaves them;
- prefill: one prompt of L tokens as a single chunk (every row attends causally), one layer.
Prints the median time per path and the native kernel's code path and error against the torch
path, which is the "torch" attention backend's: SDPA over K/V gathered from the pool (decode
rows in a few length buckets, a prefill chunk in one call).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from services.worker.model.attention import (  # noqa: E402
    AttentionMetadata, TorchAttention, _sdpa, gather_kv, plan_decode)
from services.worker.native import paged_attention as pa  # noqa: E402

HQ, HKV, D, BS, LAYERS = 9, 3, 64, 16, 30
SCALE = D ** -0.5


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def decode_case(batch: int, repeats: int, rng: random.Random) -> dict:
    lens = [rng.randint(32, 256) + rng.randint(0, 256) for _ in range(batch)]
    need = sum(-(-n // BS) for n in lens)
    num_blocks = 4 * need  # blocks scattered over a pool 4x the live set
    pool = torch.randn(LAYERS, 2, num_blocks, BS, HKV, D)
    perm = torch.randperm(num_blocks).tolist()
    tables, i = [], 0
    for n in lens:
        k = -(-n // BS)
        tables.append(perm[i:i + k])
        i += k
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    seq_lens = torch.tensor(lens)
    q = torch.randn(batch, HQ, D)

    def native():
        for layer in range(LAYERS):
            pa.paged_decode_attention(q, pool[layer, 0], pool[layer, 1], block_tables, seq_lens,
                                      SCALE)

    meta = AttentionMetadata(query_start_loc=list(range(batch + 1)), seq_lens=lens,
                             block_tables=block_tables)
    plan_decode(meta, BS)
    backend, out = TorchAttention(), torch.empty_like(q)

    def torch_path():  # the "torch" backend's decode: length-bucketed gather + SDPA
        for layer in range(LAYERS):
            backend.decode(q, pool[layer], meta, SCALE, out)

    torch_path()
    err = float((pa.paged_decode_attention(q, pool[LAYERS - 1, 0], pool[LAYERS - 1, 1],
                                           block_tables, seq_lens, SCALE) - out).abs().max())
    kv_bytes = sum(lens) * LAYERS * 2 * HKV * D * 4
    nat = median_ms(native, repeats)
    return {"case": f"decode B={batch} ({LAYERS} layers)", "mean_context": sum(lens) / batch,
            "native_ms": nat, "torch_ms": median_ms(torch_path, repeats),
            "native_gb_s": kv_bytes / nat / 1e6, "max_abs_err": err}


def prefill_case(length: int, repeats: int) -> dict:
    num_blocks = 256
    cache = torch.randn(2, num_blocks, BS, HKV, D)
    table = torch.randperm(num_blocks)[:-(-length // BS)].unsqueeze(0)
    q = torch.randn(length, HQ, D)
    row_table = torch.zeros(length, dtype=torch.int64)
    row_len = torch.arange(1, length + 1)

    def native():
        return pa.paged_attention_rows(q, cache[0], cache[1], table, row_table, row_len, SCALE)

    def torch_path():
        return _sdpa(q, *gather_kv(cache, table[0], length), SCALE)

    flops = 4 * HQ * D * length * (length + 1) / 2  # QK^T and PV over the causal half
    nat = median_ms(native, repeats)
    return {"case": f"prefill L={length} (1 layer)", "native_ms": nat,
            "torch_ms": median_ms(torch_path, repeats), "native_gflop_s": flops / nat / 1e6,
            "max_abs_err": float((native() - torch_path()).abs().max())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="decode sequences")
    p.add_argument("--prefill", default="32,144,400,700", help="prompt lengths")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not pa.available():
        raise SystemExit("the native paged-attention kernel does not build here")
    rows = [decode_case(args.batch, args.repeats, random.Random(args.seed))]
    rows += [prefill_case(int(n), args.repeats) for n in args.prefill.split(",") if n]
    print(f"{'case':32} {'native ms':>10} {'torch ms':>10} {'speedup':>8} {'max abs err':>12}")
    for r in rows:
        print(f"{r['case']:32} {r['native_ms']:10.2f} {r['torch_ms']:10.2f} "
              f"{r['torch_ms'] / r['native_ms']:7.2f}x {r['max_abs_err']:12.1e}")
    print(f"native path: {pa.isa(D, BS)}, {args.threads} threads; decode reads "
          f"{rows[0]['native_gb_s']:.1f} GB/s of K/V")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "isa": pa.isa(D, BS),
                                         "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
