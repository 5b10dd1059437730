"""Drives a model through the paged-KV attention path for one or more sequences (test harness).

The engine's model runner does this for real; the tests use this small version to check that
attention over the paged cache (non-contiguous blocks, chunked prefill, decode) is exact.
"""

from __future__ import annotations

import torch

from services.worker.model.attention import AttentionMetadata, forward_context


def make_kv_caches(cfg, num_blocks: int, block_size: int, dtype=torch.float32):
    return [torch.zeros(2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
            for _ in range(cfg.num_layers)]


class PagedSequence:
    """One sequence's tokens and block ids; `num_computed` tokens already have K/V in the cache."""

    def __init__(self, token_ids: list[int], block_ids: list[int]) -> None:
        self.token_ids = list(token_ids)
        self.block_ids = block_ids
        self.num_computed = 0


@torch.no_grad()
def paged_step(model, seqs: list[PagedSequence], chunk: list[int], kv_caches,
               block_size: int) -> torch.Tensor:
    """Runs chunk[i] new tokens of seqs[i]; returns the logits of each sequence's last token [B, V]."""
    ids, pos, slots, qsl, lens = [], [], [], [0], []
    for s, n in zip(seqs, chunk):
        start = s.num_computed
        for p in range(start, start + n):
            ids.append(s.token_ids[p])
            pos.append(p)
            slots.append(s.block_ids[p // block_size] * block_size + p % block_size)
        qsl.append(qsl[-1] + n)
        lens.append(start + n)
    width = max(len(s.block_ids) for s in seqs)
    tables = torch.tensor([s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs])
    meta = AttentionMetadata(qsl, lens, torch.tensor(slots), tables, kv_caches)
    with forward_context(meta):
        hidden = model(torch.tensor(ids), torch.tensor(pos))
    for s, n in zip(seqs, chunk):
        s.num_computed += n
    last = torch.tensor(qsl[1:]) - 1
    return model.compute_logits(hidden[last])


def paged_greedy(model, cfg, prompt: list[int], max_new: int, block_size: int = 16,
                 prefill_chunk: int | None = None) -> list[int]:
    """Greedy continuation through the paged cache, with blocks deliberately out of order."""
    total = len(prompt) + max_new
    nblocks = (total + block_size - 1) // block_size
    caches = make_kv_caches(cfg, nblocks + 3, block_size)
    # Reversed, offset block ids: a contiguous-cache bug cannot pass.
    seq = PagedSequence(prompt, list(range(nblocks + 2, 2, -1)))
    chunk = prefill_chunk or len(prompt)
    while seq.num_computed < len(prompt):
        n = min(chunk, len(prompt) - seq.num_computed)
        logits = paged_step(model, [seq], [n], caches, block_size)
    out = []
    for _ in range(max_new):
        tok = int(logits[0].argmax())
        out.append(tok)
        seq.token_ids.append(tok)
        if len(out) == max_new:
            break
        logits = paged_step(model, [seq], [1], caches, block_size)
    return out
