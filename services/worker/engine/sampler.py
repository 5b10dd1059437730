"""Sampling: host `prepare` turns per-request params into tensors once per step; `sample` runs on
the logits' device with no host sync.

Order of operations (as in vLLM/HF): penalties on raw logits -> logprobs of the raw distribution
are taken before any processing -> temperature -> min-p -> top-k -> top-p -> draw.
Random draws use the exponential race (argmax of p / E, E ~ Exp(1)) which equals sampling from p
and needs no cumulative sums or host round trips. A request with a seed owns a torch.Generator,
so its draws depend only on its seed and step, never on the batch it shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .sampling_params import SamplingParams

_EPS = 1e-10


@dataclass
class SamplingRow:
    """What the sampler needs from one request (kept out of the scheduler's Request type)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None


@dataclass
class SamplingBatch:
    """Per-step sampling tensors; B = requests that sample this step. Built by `prepare`."""

    temperature: torch.Tensor  # [B] float32; 0 marks greedy rows
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, vocab size where off; None if no row uses top-k
    top_p: torch.Tensor | None  # [B] float32; None if no row uses top-p
    min_p: torch.Tensor | None  # [B] float32; None if no row uses min-p
    # Penalties; None if no row uses them.
    repetition: torch.Tensor | None  # [B] float32
    presence: torch.Tensor | None  # [B] float32
    frequency: torch.Tensor | None  # [B] float32
    prompt_mask: torch.Tensor | None  # [B, V] bool, token appears in the prompt
    output_counts: torch.Tensor | None  # [B, V] float32, occurrences in the output so far
    generators: list[torch.Generator | None]
    num_logprobs: list[int | None]  # per row: None = no logprobs, k = sampled + top k


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    # When any row asked for logprobs (rows that did not are still computed; the caller drops them):
    sampled_logprobs: torch.Tensor | None = None  # [B] float32
    top_ids: torch.Tensor | None = None  # [B, K] int64, K = max requested
    top_logprobs: torch.Tensor | None = None  # [B, K] float32


def prepare(rows: Sequence[SamplingRow], vocab_size: int,
            device: torch.device | str = "cpu") -> SamplingBatch:
    """Host side: one pass over the rows, a handful of small tensors."""
    ps = [r.params for r in rows]
    temperature = torch.tensor([p.temperature if not p.greedy else 0.0 for p in ps],
                               dtype=torch.float32, device=device)
    all_greedy = all(p.greedy for p in ps)
    sampled = [p for p in ps if not p.greedy]

    def col(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)

    top_k = top_p = min_p = None
    if any(p.top_k is not None for p in sampled):
        top_k = col([p.top_k or vocab_size for p in ps], torch.int64).clamp_(max=vocab_size)
    if any(p.top_p < 1.0 for p in sampled):
        top_p = col([p.top_p for p in ps])
    if any(p.min_p > 0.0 for p in sampled):
        min_p = col([p.min_p for p in ps])

    repetition = presence = frequency = prompt_mask = output_counts = None
    if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in ps):
        repetition = col([p.repetition_penalty for p in ps])
        presence = col([p.presence_penalty for p in ps])
        frequency = col([p.frequency_penalty for p in ps])
        prompt_mask = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
        output_counts = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
        for i, r in enumerate(rows):
            if r.prompt_token_ids:
                prompt_mask[i, col(list(r.prompt_token_ids), torch.int64)] = True
            if r.output_token_ids:
                out = col(list(r.output_token_ids), torch.int64)
                output_counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
    return SamplingBatch(
        temperature=temperature, all_greedy=all_greedy, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition=repetition, presence=presence, frequency=frequency, prompt_mask=prompt_mask,
        output_counts=output_counts, generators=[r.generator for r in rows],
        num_logprobs=[p.logprobs for p in ps],
    )


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output, HF/vLLM rule), then OpenAI presence/frequency (output only)."""
    if b.repetition is None:
        return logits
    seen = b.prompt_mask | (b.output_counts > 0)
    rep = b.repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - b.frequency.unsqueeze(1) * b.output_counts
    return logits - b.presence.unsqueeze(1) * (b.output_counts > 0).float()


def _filter(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Masks tokens outside min-p / top-k / top-p with -inf. logits: [B, V] already temperature-scaled."""
    if b.min_p is not None:
        probs = logits.softmax(-1)
        floor = b.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if b.top_k is None and b.top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if b.top_k is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= b.top_k.unsqueeze(1), float("-inf"))
    if b.top_p is not None:
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p; the top token stays.
        before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(before >= b.top_p.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, order, sorted_logits)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] -> [B] index of each row's max, the first on ties (as argmax).

    `max(dim).indices` rather than `argmax`: the same result, and on CPU 2.6x faster over a
    [32, 49152] float32 batch here (0.46 vs 1.2 ms).
    """
    return x.max(dim=-1).indices


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Exponential race per row: argmax(p / E). Seeded rows use their own generator."""
    q = torch.empty_like(probs)
    if all(g is None for g in generators):
        q.exponential_()
    else:
        for i, g in enumerate(generators):
            q[i].exponential_(generator=g)
    return _argmax(probs.div_(q.clamp_(min=_EPS)))


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits: [B, V] float32 (raw model output) -> sampled ids and optional logprobs."""
    logits = apply_penalties(logits, b)
    out = SamplerOutput(token_ids=_argmax(logits))
    want = [k for k in b.num_logprobs if k is not None]
    raw_logprobs = logits.log_softmax(-1) if want else None
    if not b.all_greedy:
        greedy_rows = b.temperature == 0
        scaled = logits / torch.where(greedy_rows, 1.0, b.temperature).unsqueeze(1)
        probs = _filter(scaled, b).softmax(-1)
        drawn = _draw(probs, b.generators)
        out.token_ids = torch.where(greedy_rows, out.token_ids, drawn)
    if raw_logprobs is not None:
        out.sampled_logprobs = raw_logprobs.gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
        k = max(want)
        if k > 0:
            out.top_logprobs, out.top_ids = raw_logprobs.topk(k, dim=-1)
    return out
