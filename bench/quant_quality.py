"""Quality of the quantized tiers on real English text: perplexity, top-1 agreement with float32
and mean KL(float32 || variant), for float32, bf16, int8 and int4 SmolLM2.

    .venv/bin/python bench/quant_quality.py --json bench/quant_quality.json

Text: Python's help topics (`pydoc_data.topics`, every topic in key order, as bench/prompts.py),
the first `--tokens` tokens cut into windows of `--window`. Each window runs through the paged
KV cache in chunks of `--chunk` tokens. The default chunk (16) keeps every quantized matmul on
the few-row CPU kernels a decode step uses (bf16 activations), the less precise of the two
paths; `--chunk 512` measures the many-row path (prefill) instead. Targets: int8 perplexity
within 1% of float32 and top-1 >= 97%; int4 within 8% and >= 85%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from quant_models import load_variant, variants, weight_bytes  # noqa: E402

from services.common.assets import smollm2_gguf_path  # noqa: E402
from services.worker.model.attention import AttentionMetadata, forward_context  # noqa: E402

BLOCK = 16
TARGETS = {"int8": (0.01, 0.97), "int4": (0.08, 0.85)}  # (max ppl increase, min top-1)


def corpus_ids(tokenizer, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n:
        raise SystemExit(f"corpus has {len(ids)} tokens, asked for {n}")
    return ids[:n]


@torch.inference_mode()
def window_logits(model, cfg, ids: list[int], chunk: int) -> torch.Tensor:
    """Logits [W, vocab] (float32) of every position of one window, computed chunk by chunk
    through a fresh paged KV cache (identity block table)."""
    n = len(ids)
    nb = -(-n // BLOCK)
    dtype = next(model.parameters()).dtype
    caches = [torch.zeros(2, nb, BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
              for _ in range(cfg.num_layers)]
    table = torch.arange(nb).unsqueeze(0)
    out = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        pos = torch.arange(s, e)
        meta = AttentionMetadata([0, e - s], [e], slot_mapping=pos, block_tables=table,
                                 kv_caches=caches)
        with forward_context(meta):
            hidden = model(torch.tensor(ids[s:e]), pos)
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


class Scores:
    """Running sums for one variant against the float32 reference."""

    def __init__(self) -> None:
        self.nll = self.kl = 0.0
        self.agree = self.count = 0
        self.seconds = 0.0

    def add(self, logits: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> None:
        # Position i predicts token i + 1: the last position of a window has no target.
        lq = torch.log_softmax(logits[:-1].float(), dim=-1)
        lp = torch.log_softmax(ref[:-1].float(), dim=-1)
        self.nll += -lq.gather(1, targets[:, None]).sum().item()
        self.kl += (lp.exp() * (lp - lq)).sum().item()
        self.agree += (lq.argmax(-1) == lp.argmax(-1)).sum().item()
        self.count += targets.shape[0]

    def row(self) -> dict:
        return {"perplexity": math.exp(self.nll / self.count), "top1_agreement":
                self.agree / self.count, "mean_kl": self.kl / self.count,
                "tokens": self.count, "seconds": self.seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", default="float32,bf16,int8,int4")
    p.add_argument("--tokens", type=int, default=4096, help="corpus tokens scored")
    p.add_argument("--window", type=int, default=512, help="context window per sequence")
    p.add_argument("--chunk", type=int, default=16, help="tokens per forward (see above)")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--int4-head", default=None, help="int4's LM head scheme (default: worker's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    path = smollm2_gguf_path()
    table = variants(args.group_size, args.int4_head)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in table]
    if unknown or "float32" not in names:
        raise SystemExit(f"variants must include float32 and come from {sorted(table)}")
    loaded = {n: load_variant(table[n], path, with_tokenizer=(n == "float32")) for n in names}
    ids = corpus_ids(loaded["float32"].tokenizer, args.tokens)
    scores = {n: Scores() for n in names}
    for w in range(0, len(ids) - 1, args.window):
        window = ids[w:w + args.window]
        targets = torch.tensor(window[1:])
        logits = {}
        for n in names:
            start = time.perf_counter()
            logits[n] = window_logits(loaded[n].model, loaded[n].config, window, args.chunk)
            scores[n].seconds += time.perf_counter() - start
        for n in names:
            scores[n].add(logits[n], logits["float32"], targets)
        print(f"window {w // args.window + 1}/{-(-len(ids) // args.window)} done", flush=True)

    base = scores["float32"].row()["perplexity"]
    rows = {}
    print(f"\nSmolLM2-135M on {scores['float32'].count} tokens of pydoc_data.topics, windows of "
          f"{args.window}, chunks of {args.chunk}, {args.threads} threads")
    print(f"{'variant':<9}{'scheme':<26}{'weights MB':>11}{'perplexity':>11}{'vs f32':>8}"
          f"{'top-1':>8}{'mean KL':>9}  target")
    for n in names:
        r = scores[n].row()
        q = table[n].quant
        r["scheme"] = (f"{q.scheme}" + (f" g{q.group_size}" if q.scheme == "int4" else "")
                       + (f" head {q.head}" if q.enabled else "")) if q.enabled else str(
                           table[n].dtype).replace("torch.", "")
        r["weight_mb"] = weight_bytes(loaded[n].model) / 2**20
        r["ppl_increase"] = r["perplexity"] / base - 1
        target = TARGETS.get(n)
        verdict = ""
        if target:
            r["meets_target"] = r["ppl_increase"] <= target[0] and r["top1_agreement"] >= target[1]
            verdict = (f"ppl <= +{target[0]:.0%}, top-1 >= {target[1]:.0%}: "
                       + ("met" if r["meets_target"] else "NOT met"))
        rows[n] = r
        print(f"{n:<9}{r['scheme']:<26}{r['weight_mb']:>11.1f}{r['perplexity']:>11.3f}"
              f"{r['ppl_increase']:>+8.2%}{r['top1_agreement']:>8.2%}{r['mean_kl']:>9.4f}  "
              f"{verdict}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "torch": torch.__version__, "results": rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
