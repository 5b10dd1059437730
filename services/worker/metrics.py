"""Prometheus metrics of one worker, with vLLM's semantics so its dashboards translate.

Names are vLLM's (v1) with the `switchyard_worker_` prefix instead of `vllm:`, and every series
carries `model_name` (as vLLM does) plus `tier`:

| ours (switchyard_worker_...)        | vLLM                            | kind      |
|-------------------------------------|---------------------------------|-----------|
| num_requests_running / _waiting     | vllm:num_requests_running / ... | gauge     |
| kv_cache_usage_perc                 | vllm:kv_cache_usage_perc        | gauge 0-1 |
| prefix_cache_queries / _hits        | vllm:prefix_cache_queries/_hits | counter (tokens) |
| num_preemptions                     | vllm:num_preemptions            | counter   |
| prompt_tokens / generation_tokens   | vllm:prompt_tokens / ...        | counter   |
| request_success{finished_reason}    | vllm:request_success            | counter   |
| time_to_first_token_seconds         | same                            | histogram |
| inter_token_latency_seconds         | same                            | histogram |
| e2e_request_latency_seconds         | same                            | histogram |
| request_queue_time_seconds          | same                            | histogram |
| request_prefill_time_seconds / _decode_time_seconds | same            | histogram |

Ours only: `recomputed_tokens` (prompt and output tokens computed again after a preemption),
and the wasted compute of requests aborted before they finished (client cancel, router cancel,
Abort RPC, drain): `aborted_requests`, `aborted_prompt_tokens` (their prefill tokens computed,
like `prompt_tokens`: prefix-cache hits excluded, recompute included) and
`aborted_generation_tokens` (their output tokens generated). A request that finished in the
engine before its abort landed counts as finished, not wasted, even if its client never read
the end. Engine-side counts are read from the engine at scrape time
(a custom collector), so the engine thread never touches Prometheus objects; request histograms
are observed on the gRPC side as each request streams and ends. Histogram edges include the
SLO thresholds the router uses by default (TTFT 0.5/1/2.5 s, TPOT 0.05/0.1/0.2 s).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.worker.engine.output_processor import Completion

_NS = "switchyard_worker"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0,
                   300.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class WorkerMetrics:
    """One worker's registry. `engine` returns the running LLMEngine, or None while loading."""

    def __init__(self, model_name: str, tier: str, engine: Callable[[], object | None]) -> None:
        self.registry = r = CollectorRegistry()
        self.labels = {"model_name": model_name, "tier": tier}
        names = list(self.labels)

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"{_NS}_{name}", doc, names, buckets=buckets,
                             registry=r).labels(**self.labels)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens "
                        "(tokens streamed together share the interval).", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.",
                          REQUEST_BUCKETS)
        self.prefill = hist("request_prefill_time_seconds", "First scheduled to first token.",
                            REQUEST_BUCKETS)
        self.decode = hist("request_decode_time_seconds", "First token to finish.",
                           REQUEST_BUCKETS)
        self.prompt_len = hist("request_prompt_tokens", "Prompt tokens per request.",
                               TOKEN_BUCKETS)
        self.gen_len = hist("request_generation_tokens", "Output tokens per request.",
                            TOKEN_BUCKETS)
        self.success = Counter(f"{_NS}_request_success", "Finished requests by reason.",
                               names + ["finished_reason"], registry=r)
        r.register(_EngineCollector(engine, self.labels))

    def observe_tokens(self, interval_s: float, num_tokens: int) -> None:
        """A chunk of `num_tokens` arrived `interval_s` after the previous one (not the first)."""
        if num_tokens > 0:
            per = interval_s / num_tokens
            for _ in range(num_tokens):
                self.itl.observe(per)

    def observe_completion(self, c: Completion, finished_reason: str) -> None:
        t = c.timings
        self.e2e.observe(t.total_ms / 1000.0)
        self.queue.observe(t.queue_ms / 1000.0)
        self.prompt_len.observe(c.prompt_tokens)
        self.gen_len.observe(c.completion_tokens)
        if c.completion_tokens:
            self.ttft.observe(t.ttft_ms / 1000.0)
            self.prefill.observe(max(0.0, t.ttft_ms - t.queue_ms) / 1000.0)
            self.decode.observe(t.decode_ms / 1000.0)
        self.success.labels(**self.labels, finished_reason=finished_reason).inc()

    def serve_http(self, port: int, host: str = "0.0.0.0") -> None:
        """Starts /metrics on `port` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)


class _EngineCollector:
    """Reads the engine's own counters and queue/KV state when Prometheus scrapes."""

    def __init__(self, engine: Callable[[], object | None], labels: dict[str, str]) -> None:
        self._engine = engine
        self._names = list(labels)
        self._values = list(labels.values())

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(f"{_NS}_{name}", doc, labels=self._names)
        g.add_metric(self._values, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(f"{_NS}_{name}", doc, labels=self._names)
        c.add_metric(self._values, value)
        return c

    def describe(self):
        return []  # collected lazily; nothing to check at registration

    def collect(self):
        eng = self._engine()
        if eng is None:
            return
        bm, sched, st = eng.block_manager, eng.scheduler, eng.stats
        yield self._gauge("num_requests_running", "Requests in the running batch.",
                          sched.num_running)
        yield self._gauge("num_requests_waiting", "Requests queued for admission.",
                          sched.num_waiting)
        yield self._gauge("kv_cache_usage_perc", "Share of KV blocks in use (0-1); cached "
                          "free blocks count as free.", 1.0 - bm.num_free_blocks / bm.num_blocks)
        yield self._gauge("kv_cache_blocks_total", "KV blocks in the pool.", bm.num_blocks)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            bm.stats.num_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            bm.stats.num_hits)
        yield self._counter("num_preemptions", "Requests preempted (KV dropped, recomputed).",
                            st.preemptions)
        yield self._counter("prompt_tokens", "Prefill tokens computed (recompute included).",
                            st.prompt_tokens_computed)
        yield self._counter("generation_tokens", "Tokens generated.", st.generation_tokens)
        yield self._counter("recomputed_tokens", "Tokens computed again after a preemption.",
                            st.recomputed_tokens)
        yield self._counter("aborted_requests", "Requests aborted (client cancel, deadline, "
                            "Abort RPC).", st.aborted_requests)
        yield self._counter("aborted_prompt_tokens", "Prefill tokens computed for requests "
                            "that were then aborted (wasted compute).", st.aborted_prefill_tokens)
        yield self._counter("aborted_generation_tokens", "Tokens generated for requests that "
                            "were then aborted (wasted compute).", st.aborted_generated_tokens)
        yield self._counter("engine_steps", "Engine steps run.", st.steps)
        yield self._counter("engine_step_seconds", "Wall time spent in engine steps (busy "
                            "time; divided by engine_steps, the mean step).", st.step_seconds)


def read_counters(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """A worker's counters from its /metrics URL, by name without the `switchyard_worker_`
    prefix and `_total` suffix, summed over their labels (for benchmarks and tests)."""
    import urllib.request
    from collections import Counter

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=timeout_s).read().decode()
    out: Counter = Counter()
    for fam in text_string_to_metric_families(text):
        if fam.type == "counter":
            for sample in fam.samples:
                if sample.name.endswith("_total"):
                    out[sample.name.removeprefix(f"{_NS}_").removesuffix("_total")] += \
                        sample.value
    return dict(out)
