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
