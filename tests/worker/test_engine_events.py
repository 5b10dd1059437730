"""Engine events recorded per request (they become span events in the worker's traces)."""

from __future__ import annotations

import pytest

from services.worker.engine import output_processor as op
from services.worker.engine.config import CacheConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampling_params import SamplingParams
from services.worker.model.loader import load_model


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


def _drain(engine):
    done = {}
    while engine.has_unfinished:
        for event in engine.step():
            if event.completion is not None:
                done[event.request_id] = event.completion
    return done


def test_lifecycle_events_in_order(loaded):
    engine = LLMEngine(loaded, CacheConfig(block_size=16, num_blocks=64),
                       SchedulerConfig(max_model_len=512, max_num_batched_tokens=32))
    engine.add_request("a", list(range(10, 80)), SamplingParams(temperature=0.0, max_tokens=3,
                                                                ignore_eos=True))
    done = _drain(engine)
    events = done["a"].events
    names = [e.name for e in events]
    # 70 prompt tokens in 32-token steps: chunks of 32, 32, 6
    assert names == [op.EVENT_QUEUED, op.EVENT_SCHEDULED, op.EVENT_PREFILL_CHUNK,
                     op.EVENT_PREFILL_CHUNK, op.EVENT_PREFILL_CHUNK, op.EVENT_FIRST_TOKEN,
                     op.EVENT_FINISHED]
    chunks = [dict(e.attributes) for e in events if e.name == op.EVENT_PREFILL_CHUNK]
    assert chunks == [{"start": 0, "tokens": 32}, {"start": 32, "tokens": 32},
                      {"start": 64, "tokens": 6}]
    assert events[0].attributes == {"prompt_tokens": 70}
    assert events[-1].attributes == {"finish_status": "FINISHED_LENGTH"}
    times = [e.time for e in events]
    assert times == sorted(times)
    assert done["a"].num_preemptions == 0


def test_preemption_and_resume_with_recomputed_tokens(loaded):
    # 8 blocks of 16 tokens; two requests of 60 prompt tokens + 40 outputs cannot both fit:
    # the newer one is preempted, then resumes and recomputes what it lost.
    engine = LLMEngine(loaded, CacheConfig(block_size=16, num_blocks=8,
                                           enable_prefix_caching=False),
                       SchedulerConfig(max_model_len=512, max_num_batched_tokens=256))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request("old", list(range(100, 160)), params)
    engine.add_request("new", list(range(200, 260)), params)
    done = _drain(engine)
    assert engine.stats.preemptions >= 1
    victim = done["new"]
    names = [e.name for e in victim.events]
    assert op.EVENT_PREEMPTED in names and op.EVENT_RESUMED in names
    assert names.index(op.EVENT_PREEMPTED) < names.index(op.EVENT_RESUMED)
    pre = next(e for e in victim.events if e.name == op.EVENT_PREEMPTED)
    res = next(e for e in victim.events if e.name == op.EVENT_RESUMED)
    assert pre.attributes["computed_tokens"] > 60  # it had started decoding
    # no prefix caching: everything it had computed is recomputed
    assert res.attributes == {"prefix_hit_tokens": 0,
                              "recomputed_tokens": pre.attributes["computed_tokens"]}
    assert victim.num_preemptions == names.count(op.EVENT_PREEMPTED)
    assert victim.recomputed_tokens == sum(e.attributes["recomputed_tokens"]
                                           for e in victim.events if e.name == op.EVENT_RESUMED)
    assert engine.stats.recomputed_tokens == victim.recomputed_tokens > 0
    assert names[-1] == op.EVENT_FINISHED
    assert op.EVENT_PREEMPTED not in [e.name for e in done["old"].events]


def test_abort_event(loaded):
    engine = LLMEngine(loaded, CacheConfig(num_blocks=64), SchedulerConfig(max_model_len=512))
    engine.add_request("x", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=50,
                                                      ignore_eos=True))
    for _ in range(4):
        engine.step()
    final = engine.abort("x")
    last = final.completion.events[-1]
    assert last.name == op.EVENT_ABORTED and last.attributes["generated_tokens"] == 4
