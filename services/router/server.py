"""Assembly and lifecycle of one router process: gRPC (RouterService, health, reflection) and
the OpenAI-compatible HTTP API, on one asyncio event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from switchyard.router.v1 import router_pb2, router_pb2_grpc

from services.common.decode_guard import AioDecodeGuard
from services.common.grpc_options import server_options
from services.common.health_port import aio_health_server
from services.common.telemetry import Telemetry
from services.common.tls import add_port
from services.router.auth import Authenticator
from services.router.balancer import Balancer
from services.router.cache_client import CacheClient
from services.router.classifier import DifficultyClassifier
from services.router.config import RouterConfig
from services.router.dispatch import Dispatcher
from services.router.limits import Limits
from services.router.metrics import RouterMetrics
from services.router.openai_api import OpenAIApi
from services.router.replicas import Replica, ReplicaPool
from services.router.routing import Router
from services.router.service import RouterServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def load_classifier(config: RouterConfig) -> DifficultyClassifier | None:
    """The shipped (or configured) classifier; None when the config turns it off."""
    if not config.classifier.enabled:
        return None
    from services.common.assets import minilm_dir
    from services.router.classifier.model import WEIGHTS_PATH

    c = config.classifier
    return DifficultyClassifier.load(Path(c.model_dir) if c.model_dir else minilm_dir(),
                                     Path(c.weights) if c.weights else WEIGHTS_PATH)


class RouterServer:
    """Builds every collaborator from the config; `start` binds both ports."""

    def __init__(self, config: RouterConfig, classifier: DifficultyClassifier | None = None):
        """`classifier`: a preloaded one (tests share one); default = load per config."""
        self.config = config
        self.metrics = RouterMetrics(ttft_targets_s=[t.slo.ttft_ms / 1000 for t in config.tiers],
                                     tpot_targets_s=[t.slo.tpot_ms / 1000 for t in config.tiers])
        self.telemetry = Telemetry(config.tracing)
        self.classifier = classifier if classifier is not None else load_classifier(config)
        self.auth = Authenticator(config.tenants)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="classifier")
        self.pool: ReplicaPool | None = None
        self.cache: CacheClient | None = None
        self.router: Router | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        """The plaintext health-only server (config.tls.health_port)."""
        self.health_port: int | None = None
        self.http_runner: web.AppRunner | None = None
        self.health = health.aio.HealthServicer()
        self.grpc_port: int | None = None
        self.http_port: int | None = None

    def _on_replica_change(self, replica: Replica) -> None:
        self.metrics.replica_available.labels(replica.tier.label, replica.address).set(
            1 if replica.available else 0)
        if replica.ejected:
            self.metrics.ejections.labels(replica.tier.label, replica.address).inc()

    async def start(self) -> tuple[int, int]:
        """Starts the replica watchers and both servers; returns (grpc_port, http_port)."""
        cfg = self.config
        self.pool = ReplicaPool(cfg, self._on_replica_change)
        self.pool.start()
        self.cache = (CacheClient(cfg.cache, cfg.health.keepalive, cfg.tls.cache)
                      if cfg.cache is not None else None)
        self.router = Router(cfg, Dispatcher(Balancer(self.pool, cfg.balancer), cfg.max_attempts),
                             self.cache, self.classifier, Limits(list(cfg.tenants)),
                             self.metrics, self.executor, self.telemetry.tracer)

        self.grpc_server = grpc.aio.server(options=server_options(),
                                           interceptors=[AioDecodeGuard()])
        router_pb2_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(self.router, self.auth, cfg, self.metrics), self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.grpc_server)
        self.grpc_port = add_port(self.grpc_server, f"{cfg.host}:{cfg.grpc_port}",
                                  cfg.tls.server, "tls.server.")
        await self.grpc_server.start()
        if cfg.tls.health_port is not None:
            self.health_server, self.health_port = aio_health_server(
                self.health, f"{cfg.host}:{cfg.tls.health_port}")
            await self.health_server.start()

        api = OpenAIApi(self.router, self.auth, cfg, self.metrics)
        self.http_runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None)
        await self.http_runner.setup()
        site = web.TCPSite(self.http_runner, cfg.host, cfg.http_port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # the bound port when 0
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("router serving gRPC on %s:%d and HTTP on %s:%d (%d tiers, %d replicas)",
                    cfg.host, self.grpc_port, cfg.host, self.http_port, len(cfg.tiers),
                    len(self.pool.all()))
        return self.grpc_port, self.http_port

    async def wait_ready(self, timeout_s: float = 60.0) -> bool:
        """Waits until every configured replica has reported a serving load snapshot."""
        assert self.pool is not None
        return await self.pool.wait_available(timeout_s)

    async def stop(self, grace_s: float = 2.0) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace_s)
        if self.health_server is not None:  # after the main port: probes see NOT_SERVING
            await self.health_server.stop(None)
        if self.pool is not None:
            await self.pool.close()
        if self.cache is not None:
            await self.cache.close()
        self.executor.shutdown(wait=False)
        self.telemetry.shutdown()  # flushes queued spans (bounded by the export timeout)

    async def run(self) -> None:
        """Serves until SIGTERM / SIGINT."""
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        grpc_port, http_port = await self.start()
        print(f"router listening on {self.config.host}:{grpc_port} (gRPC) and "
              f"{self.config.host}:{http_port} (HTTP)", flush=True)
        await stopping.wait()
        await self.stop()
