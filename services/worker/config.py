"""Worker configuration: one frozen dataclass, built from the command line in `__main__` only."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.common.telemetry import TracingConfig
from services.common.tls import ServerTls
from services.worker.engine.config import CacheConfig
from services.worker.quant.config import SCHEME_NAMES

TIER_NAMES = ("small", "quantized", "large")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs; validated at construction."""

    model: str
    """A .gguf file, an HF checkpoint folder, or "smollm2" for the packaged SmolLM2 GGUF."""
    tier: str = "small"
    """Tier this worker serves: small, quantized or large."""
    worker_id: str = ""
    """Replica id reported in Load; empty means "<tier>-<port>"."""
    host: str = "127.0.0.1"
    port: int = 50061
    """gRPC port; 0 picks a free one (printed at start)."""
    dtype: str = "float32"
    """Weight and KV dtype. float32 is fastest on AVX2-only CPUs."""
    device: str = "cpu"
    """Where the model runs: "cpu", "cuda" or "cuda:<index>" (Triton kernels on CUDA)."""
    quantization: str = "none"
    """Weight-only quantization of the linears: none, int8 (per channel, GPTQ-rounded at load) or
    int4 (group 32 with zero points; GGUF Q4_1 loads as is). The quantized tier is this same
    service with int8 or int4 (see services/worker/quant/)."""
    threads: int = 1
    """torch intra-op threads. 1 is the safe default when other busy processes share the cores."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_model_len: int | None = None
    """Longest prompt + output; None means the model's own context length."""
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long in-flight requests may run before the worker exits anyway."""
    load_interval_ms: int = 500
    """Default interval of WatchLoad snapshots."""
    min_load_interval_ms: int = 50
    metrics_port: int | None = None
    """Port of the Prometheus /metrics endpoint (served once the model is loaded); None: off."""
    tracing: TracingConfig = field(default_factory=lambda: TracingConfig(service_name="worker"))
    """Span export (OpenTelemetry); off by default."""
    tls: ServerTls | None = None
    """TLS on `port` (mTLS with require_client_cert); None: plaintext."""
    health_port: int | None = None
    """A second, plaintext port serving only grpc.health.v1, for probes that cannot speak TLS
    (Kubernetes'); 0 picks a free one; None: none. Health is on `port` either way."""

    def __post_init__(self) -> None:
        if self.tier not in TIER_NAMES:
            raise ValueError(f"tier must be one of {TIER_NAMES}, got {self.tier!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:<index>, got {self.device!r}")
        if self.quantization not in SCHEME_NAMES:
            raise ValueError(f"quantization must be one of {SCHEME_NAMES}, got "
                             f"{self.quantization!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 when set, got {self.max_model_len}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "load_interval_ms",
                     "min_load_interval_ms"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.tls is not None and not isinstance(self.tls, ServerTls):
            raise ValueError(f"tls must be a ServerTls or None, got {self.tls!r}")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in [0, 65535], got {self.health_port}")
        if self.health_port and self.health_port == self.port:
            raise ValueError(f"health_port must differ from port, both are {self.port}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
