"""Prometheus metrics of the cache service, plus the per-tenant counters behind the Stats RPC.

Each CacheMetrics owns its CollectorRegistry, so several caches (tests, replicas in one
process) never collide; `serve_http` exposes that registry.
"""

from __future__ import annotations

import threading
from collections import Counter as TallyCounter
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_NS = "switchyard_cache"
_SIMILARITY_BUCKETS = (0.8, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 1.0)

# Per-tenant tallies reported by Stats (names match StatsResponse fields).
TENANT_COUNTERS = ("exact_hits", "semantic_hits", "misses", "stores", "dropped_stores")


class CacheMetrics:
    """Counters, gauges and histograms of one cache replica."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.lookups = Counter(f"{_NS}_lookups", "Lookups by result (CacheResult name) and the "
                               "last stage tried (exact or semantic).", ["kind", "result"],
                               registry=r)
        self.lookup_seconds = Histogram(f"{_NS}_lookup_seconds", "Lookup latency in the cache.",
                                        ["result"], buckets=_LATENCY_BUCKETS, registry=r)
        self.hit_similarity = Histogram(f"{_NS}_hit_similarity", "Cosine similarity of hits.",
                                        ["result"], buckets=_SIMILARITY_BUCKETS, registry=r)
        self.semantic_rejections = Counter(f"{_NS}_semantic_rejections", "Semantic candidates "
                                           "rejected, by reason (threshold or guard rule).",
                                           ["reason"], registry=r)
        self.stores = Counter(f"{_NS}_stores", "Entries stored.", registry=r)
        self.dropped_stores = Counter(f"{_NS}_dropped_stores", "Store calls that stored nothing, "
                                      "by reason.", ["reason"], registry=r)
        self.redis_errors = Counter(f"{_NS}_redis_errors", "Failed or timed-out Redis calls.",
                                    ["op"], registry=r)
        self.evictions = Counter(f"{_NS}_evictions", "Entries removed by the LRU bound or by "
                                 "expiry (counted by the replica that cleaned them up).",
                                 ["cause"], registry=r)
        self.invalidated = Counter(f"{_NS}_invalidated", "Entries removed by Invalidate.",
                                   ["target"], registry=r)
        self.entries = Gauge(f"{_NS}_entries", "Entries in Redis (all tenants).", registry=r)
        self.index_vectors = Gauge(f"{_NS}_index_vectors", "Vectors in this replica's index.",
                                   registry=r)
        self.redis_up = Gauge(f"{_NS}_redis_up", "1 if Redis answered the last health probe.",
                              registry=r)
        self._tenants: dict[str, TallyCounter[str]] = defaultdict(TallyCounter)
        self._lock = threading.Lock()
        self.redis_error_total = 0
        self.eviction_total = 0

    def tally(self, tenant: str, name: str) -> None:
        """Adds one to a per-tenant Stats counter (one of TENANT_COUNTERS)."""
        with self._lock:
            self._tenants[tenant][name] += 1

    def tenant_counts(self, tenant: str | None) -> dict[str, int]:
        """Per-tenant Stats counters of one tenant, or summed over all (tenant None)."""
        with self._lock:
            if tenant is not None:
                src = self._tenants.get(tenant, TallyCounter())
            else:
                src = sum(self._tenants.values(), TallyCounter())
            return {name: src[name] for name in TENANT_COUNTERS}

    def redis_error(self, op: str) -> None:
        """Counts one failed Redis call."""
        self.redis_errors.labels(op).inc()
        with self._lock:
            self.redis_error_total += 1

    def evicted(self, cause: str, n: int) -> None:
        """Counts entries removed by the LRU bound ("lru") or expiry ("expired")."""
        if n:
            self.evictions.labels(cause).inc(n)
            with self._lock:
                self.eviction_total += n

    def serve_http(self, port: int) -> None:
        """Starts the Prometheus HTTP endpoint on `port` (a daemon thread)."""
        start_http_server(port, registry=self.registry)
