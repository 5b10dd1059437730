"""Cluster parts the TLS, privacy and isolation tests configure themselves: a worker process
with extra settings (TLS, span export, log level) whose output is kept, and the cache service
with any CacheConfig overrides. Everything is real: processes, Redis, gRPC over loopback."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchyard.worker.v1 import worker_pb2_grpc

from services.common.tls import ClientTls, sync_channel
from tests.router.conftest import Worker

WORKER_SETTINGS = {"load_interval_ms": 50, "min_load_interval_ms": 20}
"""What tests/router/conftest.py's Worker writes in its --config file."""


class ConfiguredWorker(Worker):
    """`python -m services.worker` as tests/router/conftest.py runs it, plus `settings` in its
    --config file (WorkerConfig fields: tls, health_port, tracing, ...), a log level, every
    output line kept in `output`, and a channel that presents `client_tls` (None: plaintext).

    The router tests' Worker fixes the log level to WARNING and echoes output without keeping
    it; start() below repeats its command line with those two things changed."""

    def __init__(self, model: str, worker_id: str, tmp: Path, settings: dict[str, Any],
                 client_tls: ClientTls | None = None, log_level: str = "WARNING"):
        self.settings, self.client_tls, self.log_level = settings, client_tls, log_level
        self.output: list[str] = []
        super().__init__(model, worker_id, "small", tmp=tmp)

    def start(self) -> None:
        self.config_path.write_text(yaml.safe_dump({**WORKER_SETTINGS, **self.settings}))
        env = dict(os.environ, OMP_NUM_THREADS="1", SWITCHYARD_LOG_LEVEL=self.log_level)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.worker", "--config", str(self.config_path),
             "--model", self.model, "--tier", self.tier, "--worker-id", self.worker_id,
             "--port", str(self.port), "--threads", "1", "--max-model-len", "1024",
             "--block-size", "16", "--num-kv-blocks", "256", "--drain-timeout-s", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        # At DEBUG, log lines (asyncio's, torch's) may come first; the process exits (EOF)
        # if it cannot start.
        for line in self.proc.stdout:
            self.output.append(line)
            if "listening on" in line:
                break
        else:
            raise AssertionError(f"worker {self.worker_id} did not start:\n{self.text()}")
        self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        threading.Thread(target=self._keep, daemon=True).start()
        self.channel = sync_channel(self.address, [], self.client_tls)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)

    def _keep(self) -> None:
        for line in self.proc.stdout:  # keeps the pipe drained
            self.output.append(line)

    def text(self) -> str:
        return "".join(self.output)


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

    config = CacheConfig(redis_url=redis_url, key_prefix=f"rel{uuid.uuid4().hex[:6]}:", port=0,
                         grpc_workers=4, probe_interval_s=0.1, sweep_interval_s=0.5,
                         **overrides)
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
