"""Batch invariance and leak checks of the whole engine (scheduler + runner + sampler).

"Matches" follows the established rule: identical tokens, or at the first divergence only,
each side's token is among the other's top-5 logprobs (float sums in a different batch shape
may flip a near-tie). Greedy decoding, float32.
"""

from __future__ import annotations

import random

import pytest

from services.common.assets import smollm2_gguf_path
from services.worker.engine.config import CacheConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampling_params import SamplingParams
from services.worker.model.loader import load_model

SYSTEMS = [
    "You are a careful assistant who answers in one short paragraph and cites no sources.",
    "You are a pirate. Answer every question in pirate speak, with enthusiasm and brevity.",
    "You translate English into French. Reply with the translation only, nothing else.",
    "You are a math tutor. Show the steps, then give the final answer on its own line.",
]
QUESTIONS = [
    "What is the tallest mountain on Earth?", "How do vaccines work?", "Write a limerick about a cat.",
    "Why is the sky blue? Explain it to a ten year old child, with one everyday example.",
    "List the planets of the solar system in order from the sun.", "What is 17 times 23?",
    "Describe the water cycle.", "What does a compiler do, and how is it different from an "
    "interpreter? Give two examples of each and say which one Python uses by default.",
]


def _prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": SYSTEMS[i % len(SYSTEMS)]},
                {"role": "user", "content": QUESTIONS[(i * 3 + i // 4) % len(QUESTIONS)]}]
        out.append(tokenizer.encode(tokenizer.apply_chat_template(msgs)))
    return out


def _run(loaded, prompts, max_tokens, *, num_blocks, max_batched, max_seqs, prefix_caching,
         backend=None):
    engine = LLMEngine(
        loaded, CacheConfig(block_size=16, num_blocks=num_blocks,
                            enable_prefix_caching=prefix_caching),
        SchedulerConfig(max_model_len=1024, max_num_seqs=max_seqs,
                        max_num_batched_tokens=max_batched), attention_backend=backend)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5, ignore_eos=True)
    results: dict[str, tuple[list[int], list]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
        results[str(i)] = ([], [])
    while engine.has_unfinished:
        for event in engine.step():
            toks, lps = results[event.request_id]
            toks.extend(event.token_ids)
            lps.extend(event.logprobs)
    return results, engine


def _solo(loaded, prompts, max_tokens, backend=None):
    out = {}
    for i, p in enumerate(prompts):
        res, _ = _run(loaded, [p], max_tokens, num_blocks=64, max_batched=2048, max_seqs=1,
                      prefix_caching=False, backend=backend)
        out[str(i)] = res["0"]
    return out


def _matches(a, b) -> tuple[bool, bool]:
    """(matches under the top-5 rule, bitwise identical)."""
    (ta, la), (tb, lb) = a, b
    assert len(ta) == len(tb)
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x != y:
            top_a = {t for t, _ in la[i].top}
            top_b = {t for t, _ in lb[i].top}
            return (y in top_a and x in top_b), False
    return True, True


def _check_invariance(loaded, n=32, max_tokens=16, solo_backend=None, loaded_backend=None,
                      exact=False):
    """Returns how many requests produced the same tokens as their solo run; exact: also
    asserts every request's tokens and logprobs (floats, top-5 included) are its solo run's."""
    prompts = _prompts(loaded.tokenizer, n)
    assert max(len(p) for p in prompts) > 40  # some prompts are split into prefill chunks
    solo = _solo(loaded, prompts, max_tokens, solo_backend)
    # A pool far smaller than the batch needs forces preemption; 40-token steps chunk prefills.
    loaded_run, engine = _run(loaded, prompts, max_tokens, num_blocks=40, max_batched=40,
                              max_seqs=32, prefix_caching=True, backend=loaded_backend)
    assert engine.runner.attention_backend == (loaded_backend or "cpu")
    assert engine.stats.preemptions > 0
    assert engine.block_manager.stats.num_hits > 0  # shared system prompts hit the prefix cache
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    verdicts = {rid: _matches(solo[rid], loaded_run[rid]) for rid in solo}
    bad = [rid for rid, (ok, _) in verdicts.items() if not ok]
    identical = sum(same for _, same in verdicts.values())
    print(f"\n{identical}/{n} bitwise identical; preemptions {engine.stats.preemptions}; "
          f"prefix-hit tokens {engine.block_manager.stats.num_hits}")
    assert not bad, {rid: (solo[rid][0], loaded_run[rid][0]) for rid in bad}
    if exact:
        differ = [rid for rid in solo if solo[rid] != loaded_run[rid]]
        assert not differ, f"logprobs differ from the solo run for requests {differ}"
    return identical


@pytest.mark.parametrize("solo_backend,loaded_backend", [("torch", "torch"), ("torch", "cpu")])
def test_batch_invariance_tiny(tiny_model_dir, solo_backend, loaded_backend):
    """Under load with either backend, outputs match solo runs of the pure-torch backend."""
    loaded = load_model(tiny_model_dir)
    _check_invariance(loaded, solo_backend=solo_backend, loaded_backend=loaded_backend)


def test_cpu_backend_is_bitwise_batch_invariant_tiny(tiny_model_dir):
    """On the cpu backend every kernel computes a token's row the same way in any batch: the
    linears (native/linear.c), the norms, and attention, where prefill chunks and decode tokens
    are the same kind of query row. So under load, chunking, prefix-cache hits and preemption
    (recompute turns decoded tokens into prefill rows) every output is its solo run, bit for
    bit, not just within the top-5 rule."""
    loaded = load_model(tiny_model_dir)
    assert _check_invariance(loaded, solo_backend="cpu", loaded_backend="cpu", exact=True) == 32


@pytest.mark.slow
def test_batch_invariance_smollm2():
    loaded = load_model(smollm2_gguf_path())
    identical = _check_invariance(loaded, exact=True)
    assert identical == 32  # as for the tiny model: the cpu backend is row-invariant throughout


def test_random_aborts_free_every_block(tiny_model_dir):
    """Hundreds of aborts at random points (waiting, prefilling, decoding): no block leaks."""
    loaded = load_model(tiny_model_dir)
    engine = LLMEngine(loaded, CacheConfig(block_size=16, num_blocks=60),
                       SchedulerConfig(max_model_len=1024, max_num_seqs=16,
                                       max_num_batched_tokens=96, max_waiting=400))
    rng = random.Random(7)
    live: set[str] = set()
    finished: set[str] = set()
    aborted = 0
    for i in range(300):
        prompt = [rng.randrange(3, 40000) for _ in range(rng.randint(5, 200))]
        engine.add_request(f"r{i}", prompt, SamplingParams(
            temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 40), seed=i))
        live.add(f"r{i}")
        if rng.random() < 0.3:
            for event in engine.step():
                if event.completion is not None:
                    finished.add(event.request_id)
                    live.discard(event.request_id)
        for rid in [r for r in live if rng.random() < 0.1]:
            assert engine.abort(rid) is not None
            aborted += 1
            live.discard(rid)
        engine.scheduler.check_integrity()
    while engine.has_unfinished:
        for event in engine.step():
            assert event.completion is not None or event.token_ids
            if event.completion is not None:
                finished.add(event.request_id)
                live.discard(event.request_id)
    assert aborted >= 200 and not live
    assert len(finished) + aborted == 300
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_integrity([])
    assert engine.stats.aborted_requests == aborted
