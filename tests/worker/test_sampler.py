"""Sampler on hand-built logits: each filter, penalties, seeds, logprobs, and the draw itself."""

from __future__ import annotations

import math

import pytest
import torch

from services.worker.engine import sampler
from services.worker.engine.sampling_params import SamplingParams


def _sample(logits, params, prompts=None, outputs=None, generators=None):
    n = len(params)
    rows = [sampler.SamplingRow(p, (prompts or [()] * n)[i], (outputs or [()] * n)[i],
                                (generators or [None] * n)[i]) for i, p in enumerate(params)]
    batch = sampler.prepare(rows, logits.shape[-1])
    return sampler.sample(logits.clone(), batch)


def _draws(logits, params, n=4000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.shape[-1])
    for _ in range(n):
        tok = _sample(logits[None], [params], generators=[gen]).token_ids[0]
        counts[tok] += 1
    return counts / n


LOGITS = torch.log(torch.tensor([0.05, 0.4, 0.3, 0.15, 0.1]))


def test_greedy_is_argmax_per_row():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    out = _sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_greedy_takes_the_first_of_tied_maxima():
    """Ties (common after penalties or in low-precision logits) go to the lowest token id, in
    every row of a batch wide enough for the vectorized reduction."""
    logits = torch.zeros(3, 49152)
    logits[0, [7, 20848, 40000]] = 5.0
    logits[1, [48000, 30000]] = 2.0
    out = _sample(logits, [SamplingParams(temperature=0.0)] * 3)
    assert out.token_ids.tolist() == [7, 30000, 0]


def test_exponential_race_follows_the_distribution():
    freq = _draws(LOGITS, SamplingParams(temperature=1.0))
    assert torch.allclose(freq, LOGITS.exp(), atol=0.03), freq


def test_top_k_keeps_only_k_tokens():
    freq = _draws(LOGITS, SamplingParams(temperature=1.0, top_k=2), n=2000)
    assert set(torch.nonzero(freq).flatten().tolist()) == {1, 2}
    assert abs(freq[1] - 0.4 / 0.7) < 0.04


def test_top_p_keeps_the_smallest_nucleus():
    # Sorted probs 0.4, 0.3, 0.15, 0.1, 0.05: top_p 0.7 keeps {0.4, 0.3}; 0.71 adds 0.15.
    assert set(torch.nonzero(_draws(LOGITS, SamplingParams(top_p=0.7), n=1500)).flatten().tolist()) == {1, 2}
    kept = set(torch.nonzero(_draws(LOGITS, SamplingParams(top_p=0.71), n=1500)).flatten().tolist())
    assert kept == {1, 2, 3}


def test_min_p_drops_unlikely_tokens():
    # min_p 0.3: threshold 0.3 * 0.4 = 0.12, so 0.1 and 0.05 go.
    kept = set(torch.nonzero(_draws(LOGITS, SamplingParams(min_p=0.3), n=1500)).flatten().tolist())
    assert kept == {1, 2, 3}


def test_temperature_sharpens():
    cold = _draws(LOGITS, SamplingParams(temperature=0.25), n=2000)
    assert cold[1] > 0.7  # 0.4^4 / sum(p^4) = 0.74


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.5,
                       frequency_penalty=0.25, logprobs=0)
    rows = [sampler.SamplingRow(p, prompt_token_ids=(0,), output_token_ids=(1, 1, 3))]
    batch = sampler.prepare(rows, 4)
    got = sampler.apply_penalties(logits.clone(), batch)
    # token 0: in prompt -> 2/2 = 1; token 1: seen, negative -> -2, twice in output -> -0.5 - 0.5
    # token 2: untouched; token 3: seen, positive -> 1.5, once in output -> -0.25 - 0.5
    assert torch.allclose(got, torch.tensor([[1.0, -3.0, 0.5, 0.75]]))


def test_seed_gives_same_tokens_whatever_the_batch():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=1.0, seed=42)

    def run(batch_size):
        gen = torch.Generator().manual_seed(42)
        others = [SamplingParams(temperature=1.0)] * (batch_size - 1)
        toks = []
        for _ in range(20):
            out = _sample(logits.repeat(batch_size, 1), [p] + others,
                          generators=[gen] + [None] * (batch_size - 1))
            toks.append(int(out.token_ids[0]))
        return toks

    assert run(1) == run(7)
    assert len(set(run(1))) > 3  # it really samples


def test_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.0, logprobs=4), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, logprobs=0)]
    out = _sample(logits, params)
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.sampled_logprobs, ref.gather(1, out.token_ids[:, None])[:, 0])
    assert torch.equal(out.top_ids[0], ref[0].topk(4).indices)
    assert math.isclose(float(out.top_logprobs[0, 0]), float(ref[0].max()), rel_tol=1e-6)


def test_no_logprobs_requested_computes_none():
    out = _sample(torch.randn(2, 10), [SamplingParams(temperature=0.0)] * 2)
    assert out.sampled_logprobs is None and out.top_ids is None


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=0),
                                 dict(min_p=1.5), dict(repetition_penalty=0.0)])
def test_invalid_params_are_named(bad):
    from services.worker.engine.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        SamplingParams(**bad)
    assert info.value.field == next(iter(bad))
