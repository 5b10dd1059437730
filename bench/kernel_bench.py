"""Triton kernel benchmark for a CUDA GPU (written for an H100): each kernel's median time, its
achieved bandwidth against the device's measured copy bandwidth, and end-to-end decode
tokens/s for batch 1 and 32 with and without CUDA graphs for the decode step.

    .venv/bin/python bench/kernel_bench.py --json bench/kernel_bench.json
    .venv/bin/python bench/kernel_bench.py --skip-e2e --dtype float16

Every kernel is first checked against its torch reference on the benchmark's own inputs, then
timed with `triton.testing.do_bench` (median). "GB/s" counts the bytes a kernel must move at
least once (inputs read, outputs written); "% copy" divides it by a device-to-device copy's
rate measured the same way. Attention prefill and the quantized matmuls at 64+ rows are
compute-bound, so their TFLOP/s are printed too.

End to end: SmolLM2-135M from its GGUF, on the GPU in `--dtype`, attention through the "triton"
backend and its kernels, quantized linears through the Triton matmuls (`--quantization`).
B sequences hold `--context` tokens of cache; one decode step is embedding -> 30 layers ->
LM head -> argmax, with the next step's ids, positions, slots and lengths updated on the GPU, so
the step can be captured once as a CUDA graph and replayed. Exits with a message on machines
without CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def require_cuda() -> None:
    import os

    if not torch.cuda.is_available():
        raise SystemExit(f"kernel_bench.py needs a CUDA GPU: torch {torch.__version__} sees none "
                         "(torch.cuda.is_available() is False). Run it on a GPU machine; the "
                         "kernels' CPU checks are the tests (TRITON_INTERPRET=1 pytest "
                         "tests/worker/kernels).")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("TRITON_INTERPRET is set: kernels would run in the CPU interpreter. "
                         "Unset it to benchmark on the GPU.")


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy rate in GB/s (bytes read + written), 1 GiB each way."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e6


class Report:
    def __init__(self, copy_gbs: float) -> None:
        self.copy_gbs = copy_gbs
        self.rows: list[dict] = []
        print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {copy_gbs:.0f} GB/s\n")
        print(f"{'kernel':<24}{'case':<34}{'us':>9}{'GB/s':>8}{'% copy':>8}{'TFLOP/s':>9}"
              f"{'torch us':>10}")

    def add(self, kernel: str, case: str, ms: float, nbytes: int, flops: float = 0.0,
            torch_ms: float | None = None) -> None:
        gbs = nbytes / ms / 1e6
        row = {"kernel": kernel, "case": case, "us": ms * 1e3, "gb_s": gbs,
               "pct_copy": 100 * gbs / self.copy_gbs, "tflops": flops / ms / 1e9,
               "torch_us": None if torch_ms is None else torch_ms * 1e3}
        self.rows.append(row)
        ref = "" if torch_ms is None else f"{torch_ms * 1e3:>10.1f}"
        tf = f"{row['tflops']:>9.1f}" if flops else f"{'':>9}"
        print(f"{kernel:<24}{case:<34}{row['us']:>9.1f}{gbs:>8.0f}{row['pct_copy']:>7.0f}%"
              f"{tf}{ref}", flush=True)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float) -> None:
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))
    if not err <= tol:
        raise AssertionError(f"{what}: max error {err.item():.3g} relative to max |ref| > {tol}")


def _paged_layout(seq_lens: list[int], block: int, device) -> tuple[torch.Tensor, int]:
    need = [math.ceil(n / block) for n in seq_lens]
    perm = torch.randperm(sum(need) + 8, device=device)
    rows, i = [], 0
    width = max(need)
    for n in need:
        rows.append(torch.cat([perm[i:i + n], perm.new_zeros(width - n)]))
        i += n
    return torch.stack(rows), sum(need) + 8


def bench_kernels(rep: Report, dtype: torch.dtype) -> None:
    from services.worker.kernels.int4_format import pack_int4
    from services.worker.kernels.kv_write import kv_write_reference, kv_write_triton
    from services.worker.kernels.paged_attention import (
        paged_attention_reference,
        paged_attention_triton,
    )
    from services.worker.kernels.quant_matmul import (
        int4_matmul_reference,
        int4_matmul_triton,
        int8_matmul_reference,
        int8_matmul_triton,
    )
    from services.worker.kernels.rmsnorm import rms_norm_reference, rms_norm_triton
    from services.worker.kernels.rope import rope_reference, rope_triton

    dev, el = "cuda", torch.empty((), dtype=dtype).element_size()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    hq, hkv, d, block = 32, 8, 128, 16  # Llama-3-8B attention shape

    for t in (32, 4096):  # a decode batch, a prefill chunk
        nb = t // block + 8
        cache = torch.zeros(2, nb, block, hkv, d, dtype=dtype, device=dev)
        k, v = (torch.randn(t, hkv, d, dtype=dtype, device=dev) for _ in range(2))
        slots = torch.randperm(nb * block, device=dev)[:t]
        want = cache.clone()
        kv_write_reference(want, k, v, slots)
        kv_write_triton(cache, k, v, slots)
        _close(cache, want, "kv_write", 0)
        rep.add("kv_write", f"T={t} Hkv={hkv} D={d}",
                bench_ms(lambda: kv_write_triton(cache, k, v, slots)), 4 * t * hkv * d * el,
                torch_ms=bench_ms(lambda: kv_write_reference(cache, k, v, slots)))

    for t, h in ((32, 4096), (4096, 4096)):
        x, r = (torch.randn(t, h, dtype=dtype, device=dev) for _ in range(2))
        w = torch.rand(h, dtype=dtype, device=dev) + 0.5
        for got, want in zip(rms_norm_triton(x, w, 1e-5, r), rms_norm_reference(x, w, 1e-5, r)):
            _close(got, want, "rms_norm", tol)
        rep.add("add+rms_norm", f"T={t} H={h}", bench_ms(lambda: rms_norm_triton(x, w, 1e-5, r)),
                (4 * t * h + h) * el,
                torch_ms=bench_ms(lambda: rms_norm_reference(x, w, 1e-5, r)))

    pos_table = torch.arange(8192, device=dev, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d))
    cos, sin = torch.outer(pos_table, inv).cos(), torch.outer(pos_table, inv).sin()
    for t in (32, 4096):
        q = torch.randn(t, hq, d, dtype=dtype, device=dev)
        k = torch.randn(t, hkv, d, dtype=dtype, device=dev)
        pos = torch.randint(0, 8192, (t,), device=dev)
        for got, want in zip(rope_triton(q, k, pos, cos, sin), rope_reference(q, k, pos, cos, sin)):
            _close(got, want, "rope", tol)
        rep.add("rope (q and k)", f"T={t} Hq={hq} Hkv={hkv} D={d}",
                bench_ms(lambda: rope_triton(q, k, pos, cos, sin)), 2 * t * (hq + hkv) * d * el,
                torch_ms=bench_ms(lambda: rope_reference(q, k, pos, cos, sin)))

    for b, ctx, new in ((1, 4096, 1), (32, 1024, 1), (32, 4096, 1), (1, 2048, 2048),
                        (4, 1536, 512)):
        lens = [ctx] * b
        tables, nb = _paged_layout(lens, block, dev)
        cache = torch.randn(2, nb, block, hkv, d, dtype=dtype, device=dev)
        qsl = torch.arange(0, (b + 1) * new, new, dtype=torch.int32, device=dev)
        sl = torch.tensor(lens, dtype=torch.int32, device=dev)
        q = torch.randn(b * new, hq, d, dtype=dtype, device=dev)
        scale = d ** -0.5
        _close(paged_attention_triton(q, cache, tables, qsl, sl, scale, new),
               paged_attention_reference(q, cache, tables, qsl, sl, scale), "paged_attention", tol)
        kv_bytes = 2 * b * ctx * hkv * d * el + 2 * q.numel() * el
        flops = 4 * b * hq * d * (new * (ctx - new) + new * (new + 1) / 2)
        kind = "decode" if new == 1 else ("prefill" if new == ctx else "chunked prefill")
        rep.add(f"paged_attention {kind}", f"B={b} ctx={ctx} new={new} G={hq // hkv}",
                bench_ms(lambda: paged_attention_triton(q, cache, tables, qsl, sl, scale, new)),
                kv_bytes, flops)

    n = k_ = 4096
    for m in (1, 16, 64):
        x = torch.randn(m, k_, dtype=dtype, device=dev)
        w = torch.randn(n, k_, dtype=dtype, device=dev)
        q8 = torch.randint(-127, 128, (n, k_), dtype=torch.int8, device=dev)
        s8 = torch.rand(n, device=dev) * 0.01
        _close(int8_matmul_triton(x, q8, s8), int8_matmul_reference(x, q8, s8), "int8 matmul", tol)
        torch_ms = bench_ms(lambda: torch.nn.functional.linear(x, w))
        rep.add("int8 matmul", f"M={m} N={n} K={k_}",
                bench_ms(lambda: int8_matmul_triton(x, q8, s8)),
                n * k_ + 4 * n + m * (n + k_) * el, 2 * m * n * k_, torch_ms)
        for g in (32, 128):
            qw = pack_int4(torch.randint(0, 16, (n, k_), device=dev))
            sc = torch.rand(n, k_ // g, device=dev) * 0.02
            z = torch.randn(n, k_ // g, device=dev) * 0.01
            _close(int4_matmul_triton(x, qw, sc, z, g), int4_matmul_reference(x, qw, sc, z, g),
                   "int4 matmul", tol)
            rep.add("int4 matmul", f"M={m} N={n} K={k_} group={g}",
                    bench_ms(lambda: int4_matmul_triton(x, qw, sc, z, g)),
                    n * k_ // 2 + 8 * n * k_ // g + m * (n + k_) * el, 2 * m * n * k_, torch_ms)
    print("(torch us: the torch reference; for the matmuls, F.linear with the weight in the "
          "activation dtype)")


@torch.inference_mode()
def bench_e2e(args, dtype: torch.dtype) -> list[dict]:
    from services.common.assets import smollm2_gguf_path
    from services.worker.kernels.attention_backend import TritonAttention, TritonAttentionMetadata
    from services.worker.model.attention import forward_context
    from services.worker.model.loader import load_model
    from services.worker.quant.config import QuantConfig

    results = []
    print(f"\nend to end: SmolLM2-135M {str(dtype)[6:]}, context {args.context}, "
          f"{args.steps} decode steps")
    print(f"{'quantization':<13}{'batch':>6}{'graphs':>8}{'step ms':>9}{'tok/s':>10}")
    for scheme in args.quantization.split(","):
        quant = QuantConfig(scheme, int8_method="rtn") if scheme == "int8" else QuantConfig(scheme)
        loaded = load_model(smollm2_gguf_path(), dtype=dtype, device="cuda",
                            quantization=quant, with_tokenizer=False)
        model, cfg = loaded.model, loaded.config
        backend = TritonAttention()
        for batch in (1, 32):
            bs = 16
            max_blocks = math.ceil((args.context + args.steps + 8) / bs)
            caches = [torch.zeros(2, batch * max_blocks, bs, cfg.num_kv_heads, cfg.head_dim,
                                  dtype=dtype, device="cuda") for _ in range(cfg.num_layers)]
            tables = torch.arange(batch * max_blocks, device="cuda").view(batch, max_blocks)
            # Prefill: every sequence's context in one step (random ids: speed only).
            ctx = args.context
            ids = torch.randint(100, cfg.vocab_size, (batch * ctx,), device="cuda")
            pos = torch.arange(ctx, device="cuda").repeat(batch)
            slots = (tables.gather(1, (pos.view(batch, ctx) // bs)) * bs
                     + pos.view(batch, ctx) % bs).reshape(-1)
            meta = TritonAttentionMetadata(
                query_start_loc=list(range(0, (batch + 1) * ctx, ctx)), seq_lens=[ctx] * batch,
                slot_mapping=slots, block_tables=tables, kv_caches=caches, backend=backend,
                query_start_loc_t=torch.arange(0, (batch + 1) * ctx, ctx, dtype=torch.int32,
                                               device="cuda"),
                seq_lens_t=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
                max_query_len=ctx)
            with forward_context(meta):
                hidden = model(ids, pos)
            last = torch.arange(ctx - 1, batch * ctx, ctx, device="cuda")
            # Static decode-step state, advanced on the GPU by the step itself.
            tok = model.compute_logits(hidden[last]).argmax(-1)
            positions = torch.full((batch,), ctx, dtype=torch.int64, device="cuda")
            seq_lens = torch.full((batch,), ctx + 1, dtype=torch.int32, device="cuda")
            slot = torch.empty(batch, dtype=torch.int64, device="cuda")
            dmeta = TritonAttentionMetadata(
                query_start_loc=list(range(batch + 1)), seq_lens=[ctx + 1] * batch,
                slot_mapping=slot, block_tables=tables, kv_caches=caches, backend=backend,
                query_start_loc_t=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                seq_lens_t=seq_lens, max_query_len=1)

            def step() -> None:
                slot.copy_(tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs)
                with forward_context(dmeta):
                    h = model(tok, positions)
                tok.copy_(model.compute_logits(h).argmax(-1))
                positions.add_(1)
                seq_lens.add_(1)

            for graphs in (False, True):
                positions.fill_(ctx)
                seq_lens.fill_(ctx + 1)
                run = step
                if graphs:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(3):  # warm up (Triton compiles, allocator) off-graph
                            step()
                    torch.cuda.current_stream().wait_stream(side)
                    positions.fill_(ctx)
                    seq_lens.fill_(ctx + 1)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        step()
                    positions.fill_(ctx)
                    seq_lens.fill_(ctx + 1)
                    run = graph.replay
                else:
                    for _ in range(3):
                        step()
                    positions.fill_(ctx)
                    seq_lens.fill_(ctx + 1)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for _ in range(args.steps):
                    run()
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / args.steps
                r = {"quantization": scheme, "batch": batch, "cuda_graphs": graphs,
                     "step_ms": ms, "tokens_per_s": batch * 1e3 / ms}
                results.append(r)
                print(f"{scheme:<13}{batch:>6}{'yes' if graphs else 'no':>8}{ms:>9.3f}"
                      f"{r['tokens_per_s']:>10.0f}", flush=True)
        del model, loaded
        torch.cuda.empty_cache()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--quantization", default="none,int8,int4",
                   help="end-to-end variants (comma-separated)")
    p.add_argument("--context", type=int, default=512, help="e2e: cached tokens per sequence")
    p.add_argument("--steps", type=int, default=128, help="e2e: timed decode steps")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    require_cuda()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rep = Report(copy_bandwidth())
    if not args.skip_kernels:
        bench_kernels(rep, dtype)
    e2e = [] if args.skip_e2e else bench_e2e(args, dtype)
    if args.json:
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "dtype": args.dtype, "torch": torch.__version__,
            "copy_gb_s": rep.copy_gbs, "kernels": rep.rows, "e2e": e2e}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
