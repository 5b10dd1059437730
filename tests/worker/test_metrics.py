"""Worker Prometheus metrics: engine counters read at scrape time, request histograms."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from services.worker.engine.config import CacheConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampling_params import SamplingParams
from services.worker.metrics import WorkerMetrics
from services.worker.model.loader import load_model


def _samples(metrics: WorkerMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in fam.samples:
            extra = tuple(sorted((k, v) for k, v in s.labels.items()
                                 if k not in ("model_name", "tier")))
            out[(s.name, extra)] = s.value
            assert s.labels.get("model_name") == "tiny" and s.labels.get("tier") == "small"
    return out


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_scrape_matches_the_workload(loaded):
    engine = LLMEngine(loaded, CacheConfig(block_size=16, num_blocks=8,
                                           enable_prefix_caching=True),
                       SchedulerConfig(max_model_len=512, max_num_batched_tokens=256))
    metrics = WorkerMetrics("tiny", "small", lambda: engine)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request("a", list(range(100, 160)), params)
    engine.add_request("b", list(range(200, 260)), params)  # forces a preemption (8 blocks)
    engine.add_request("c", [7, 8, 9], SamplingParams(temperature=0.0, max_tokens=30,
                                                      ignore_eos=True))
    ends = {}
    c_tokens = 0
    while engine.has_unfinished:
        for ev in engine.step():
            if ev.completion is not None:
                ends[ev.request_id] = ev.completion
            if ev.request_id == "c":
                c_tokens += len(ev.token_ids)
        if c_tokens == 3 and "c" not in ends:  # abort "c" once it has made 3 tokens
            ends["c"] = engine.abort("c").completion
    for rid, c in ends.items():
        metrics.observe_completion(c, "abort" if rid == "c" else "length")
    metrics.observe_tokens(0.2, 4)

    s = _samples(metrics)
    st = engine.stats
    assert s[("switchyard_worker_generation_tokens_total", ())] == st.generation_tokens == 80 + 3
    assert s[("switchyard_worker_engine_steps_total", ())] == st.steps > 0
    assert s[("switchyard_worker_engine_step_seconds_total", ())] == st.step_seconds > 0
    assert s[("switchyard_worker_num_preemptions_total", ())] == st.preemptions >= 1
    assert s[("switchyard_worker_recomputed_tokens_total", ())] == st.recomputed_tokens > 0
    assert s[("switchyard_worker_aborted_requests_total", ())] == 1
    assert s[("switchyard_worker_aborted_generation_tokens_total", ())] == 3
    assert s[("switchyard_worker_num_requests_running", ())] == 0
    assert s[("switchyard_worker_kv_cache_usage_perc", ())] == 0.0
    assert s[("switchyard_worker_prefix_cache_queries_total", ())] == \
        engine.block_manager.stats.num_queries > 0
    assert s[("switchyard_worker_request_success_total", (("finished_reason", "length"),))] == 2
    assert s[("switchyard_worker_request_success_total", (("finished_reason", "abort"),))] == 1
    assert s[("switchyard_worker_e2e_request_latency_seconds_count", ())] == 3
    assert s[("switchyard_worker_time_to_first_token_seconds_count", ())] == 3
    assert s[("switchyard_worker_request_generation_tokens_sum", ())] == 83
    assert s[("switchyard_worker_request_prompt_tokens_sum", ())] == 123
    assert s[("switchyard_worker_inter_token_latency_seconds_count", ())] == 4
    assert s[("switchyard_worker_inter_token_latency_seconds_sum", ())] == pytest.approx(0.2)
    # the SLO edges the router uses are bucket edges
    assert ("switchyard_worker_time_to_first_token_seconds_bucket", (("le", "0.5"),)) in s
    assert ("switchyard_worker_inter_token_latency_seconds_bucket", (("le", "0.1"),)) in s


def test_no_engine_yet_exports_only_request_metrics():
    metrics = WorkerMetrics("tiny", "small", lambda: None)
    text = generate_latest(metrics.registry).decode()
    assert "switchyard_worker_num_requests_running" not in text
    assert "switchyard_worker_time_to_first_token_seconds" in text


def test_prefill_and_wasted_compute_are_exact(loaded):
    """`prompt_tokens` counts prefill positions only (decode steps are generation), and the
    aborted_* counters count exactly the work done for requests aborted before finishing: a
    prefix-cache hit is not work, a request aborted while waiting did none, and an abort that
    lands after the request finished is no abort at all."""
    engine = LLMEngine(loaded, CacheConfig(block_size=16, num_blocks=64,
                                           enable_prefix_caching=True),
                       SchedulerConfig(max_model_len=512, max_num_batched_tokens=256))
    metrics = WorkerMetrics("tiny", "small", lambda: engine)
    long = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)

    def run_until(rid: str, outputs: int) -> None:
        made = 0
        while made < outputs:
            made += sum(len(ev.token_ids) for ev in engine.step() if ev.request_id == rid)

    prompt_a = list(range(100, 140))  # 40 tokens: two full blocks, then 8
    engine.add_request("a", prompt_a, long)
    run_until("a", 3)
    assert engine.abort("a").completion.completion_tokens == 3
    # "b" shares a's two full blocks (freed by the abort, still cached): 8 tokens to compute.
    engine.add_request("b", prompt_a[:32] + list(range(500, 508)), long)
    run_until("b", 2)
    events = engine.abort("b").completion.events
    assert events[-1].attributes == {"generated_tokens": 2, "prefill_tokens": 8}
    engine.add_request("c", [1, 2, 3], long)
    assert engine.abort("c") is not None  # never scheduled: no work wasted
    engine.add_request("d", [7, 8, 9, 10, 11], SamplingParams(temperature=0.0, max_tokens=2,
                                                              ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    assert engine.abort("d") is None  # finished first: not wasted

    s = _samples(metrics)
    assert s[("switchyard_worker_prompt_tokens_total", ())] == 40 + 8 + 5
    assert s[("switchyard_worker_generation_tokens_total", ())] == 3 + 2 + 2
    assert s[("switchyard_worker_aborted_requests_total", ())] == 3
    assert s[("switchyard_worker_aborted_prompt_tokens_total", ())] == 40 + 8
    assert s[("switchyard_worker_aborted_generation_tokens_total", ())] == 3 + 2


def test_wasted_prefill_includes_recompute_after_preemption(loaded):
    """A request preempted and then aborted wasted its first prefill and the recompute."""
    engine = LLMEngine(loaded, CacheConfig(block_size=16, num_blocks=8,
                                           enable_prefix_caching=False),
                       SchedulerConfig(max_model_len=512, max_num_batched_tokens=256))
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    engine.add_request("a", list(range(100, 160)), params)  # 60 + 60 tokens need all 8 blocks
    engine.add_request("b", list(range(200, 260)), params)
    preempted = False
    while not preempted:
        engine.step()
        preempted = engine.stats.preemptions > 0
    victim = "b"  # the newest running request is preempted first
    while engine.scheduler.get_request(victim).num_computed_tokens == 0:
        engine.step()  # resumes once "a" is done, computing its prompt and outputs again
    req = engine.scheduler.get_request(victim)
    outputs = req.num_output_tokens
    computed = req.num_computed_tokens
    event = engine.abort(victim)
    assert event.completion.recomputed_tokens > 0
    # Prefill: the first 60, then (on resume) every known token but the last, which decodes.
    assert engine.stats.aborted_prefill_tokens == 60 + (computed - 1)
    assert engine.stats.aborted_generated_tokens == outputs
