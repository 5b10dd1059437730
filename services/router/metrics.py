"""Prometheus metrics of one router (its own registry, served at /metrics on the HTTP port).

Label `route` is how the request was decided: cache, hint, classifier, cascade or default;
`tier` the tier that answered (for cache hits, the tier that produced the cached answer).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.router.slo import Latency

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def with_edges(buckets: tuple[float, ...], edges_s) -> tuple[float, ...]:
    """`buckets` plus the SLO thresholds (seconds) as edges, so "share under target" is exact."""
    return tuple(sorted(set(buckets) | {round(e, 6) for e in edges_s}))


class RouterMetrics:
    def __init__(self, ttft_targets_s=(), tpot_targets_s=()) -> None:
        """ttft_targets_s / tpot_targets_s: the configured SLO thresholds (bucket edges)."""
        self.registry = r = CollectorRegistry()
        labels = ("tier", "route")
        self.ttft = Histogram("switchyard_router_ttft_seconds", "Time to first token at the router",
                              labels, buckets=with_edges(_LATENCY_BUCKETS, ttft_targets_s),
                              registry=r)
        self.tpot = Histogram("switchyard_router_tpot_seconds", "Time per output token after the "
                              "first", labels, buckets=with_edges(_TPOT_BUCKETS, tpot_targets_s),
                              registry=r)
        self.e2e = Histogram("switchyard_router_e2e_seconds", "Arrival to last byte", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.slo_requests = Counter("switchyard_router_slo_requests", "Finished requests "
                                    "evaluated against their tier's SLO", labels, registry=r)
        self.goodput = Counter("switchyard_router_goodput_requests", "Finished requests that met "
                               "both the TTFT and TPOT targets", labels, registry=r)
        self.requests = Counter("switchyard_router_requests", "Requests by outcome",
                                ("api", "outcome"), registry=r)
        self.cache_results = Counter("switchyard_router_cache_results", "Response-cache results",
                                     ("result",), registry=r)
        self.decisions = Counter("switchyard_router_decisions", "Tier decisions",
                                 ("route", "tier"), registry=r)
        self.classifier_seconds = Histogram(
            "switchyard_router_classifier_seconds", "Difficulty classifier latency",
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1), registry=r)
        self.retries = Counter("switchyard_router_retries", "Dispatch attempts beyond the first",
                               ("tier",), registry=r)
        self.fallbacks = Counter("switchyard_router_fallbacks", "Requests served by a fallback "
                                 "tier", ("from_tier", "to_tier"), registry=r)
        self.escalations = Counter("switchyard_router_cascade_escalations", "Cascade answers "
                                   "escalated for low confidence", registry=r)
        self.rejections = Counter("switchyard_router_rejections", "Requests refused before "
                                  "routing", ("reason",), registry=r)
        self.replica_available = Gauge("switchyard_router_replica_available", "1 if the replica "
                                       "is in rotation", ("tier", "replica"), registry=r)
        self.ejections = Counter("switchyard_router_replica_ejections", "Replica ejections",
                                 ("tier", "replica"), registry=r)
        self.overhead = Histogram("switchyard_router_dispatch_overhead_seconds", "Arrival to "
                                  "the worker call (auth, limits, cache, classifier, choice)",
                                  buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05,
                                           0.1), registry=r)

    def observe_latency(self, tier: str, route: str, latency: Latency, met: bool) -> None:
        self.ttft.labels(tier, route).observe(latency.ttft_ms / 1000.0)
        self.e2e.labels(tier, route).observe(latency.e2e_ms / 1000.0)
        if latency.tpot_ms is not None:
            self.tpot.labels(tier, route).observe(latency.tpot_ms / 1000.0)
        self.slo_requests.labels(tier, route).inc()
        if met:
            self.goodput.labels(tier, route).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
