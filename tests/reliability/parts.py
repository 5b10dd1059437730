"""Cluster parts the TLS, privacy and isolation tests configure themselves: a worker process
with extra settings (TLS, span export, log level) whose output is kept, and the cache service
with any CacheConfig overrides. Everything is real: processes, Redis, gRPC over loopback."""

from __future__ import annotations

import functools
import uuid
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import ClientTls, sync_channel
from tests.router.conftest import Worker

class ConfiguredWorker(Worker):
    """A small-tier worker with `settings` in its --config file, a log level, and a channel
    that presents `client_tls` (None: plaintext)."""

    def __init__(self, model: str, worker_id: str, tmp: Path, settings: dict[str, Any],
                 client_tls: ClientTls | None = None, log_level: str = "WARNING"):
        super().__init__(model, worker_id, "small", tmp=tmp, settings=settings,
                         log_level=log_level, client_tls=client_tls)


@functools.lru_cache(maxsize=1)
def embedder():
    """The cache's MiniLM, built once per test process (as tests/router/conftest.py does)."""
    import torch

    from services.cache.embedder import MiniLMEmbedder
    from services.common.assets import minilm_dir
    from services.router.classifier.embedder import build_minilm

    fast = build_minilm(minilm_dir(), max_tokens=256, dtype=torch.bfloat16)
    fast.warm_up(32)
    return MiniLMEmbedder(fast, dim=384)


def start_cache(redis_url: str, **overrides: Any):
    """The real cache service in this process, on a key prefix of its own; returns the
    started CacheServer."""
    from services.cache.config import CacheConfig
    from services.cache.server import CacheServer

    # A 2 s Redis timeout unless a test sets one: a 50 ms one trips on a loaded CI machine.
    settings = dict(grpc_workers=4, probe_interval_s=0.1, sweep_interval_s=0.5,
                    redis_timeout_s=2.0) | overrides
    config = CacheConfig(redis_url=redis_url, key_prefix=f"rel{uuid.uuid4().hex[:6]}:", port=0,
                         **settings)
    server = CacheServer(config, embedder())
    server.start()
    return server


def health_status(target: str, tls: ClientTls | None = None, timeout: float = 5.0) -> str:
    """The grpc.health.v1 status name at `target` (raises grpc.RpcError when refused)."""
    with sync_channel(target, [], tls) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def refusal(target: str, tls: ClientTls | None) -> grpc.RpcError:
    """The error of a health check at `target` with `tls`; fails the test if it succeeds."""
    try:
        health_status(target, tls)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{target} answered a client it should have refused")
