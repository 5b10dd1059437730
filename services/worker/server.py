"""Worker process lifecycle: listen first (NOT_SERVING), load the model, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common.assets import smollm2_gguf_path
from services.common.decode_guard import AioDecodeGuard
from services.common.grpc_options import server_options
from services.common.health_port import aio_health_server
from services.common.telemetry import Telemetry
from services.common.tls import add_port
from services.worker.config import WorkerConfig
from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.metrics import WorkerMetrics
from services.worker.model.loader import load_model
from services.worker.observe import Observability
from services.worker.service import WorkerServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
# Named model shortcuts, so the README and configs need no site-packages paths.
MODEL_ALIASES = {"smollm2": smollm2_gguf_path}


def resolve_model(model: str) -> Path:
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model]()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {model!r} is neither a path nor one of {sorted(MODEL_ALIASES)}")
    return path


def build_engine(config: WorkerConfig) -> LLMEngine:
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {config.device!r} requested, but this torch build sees no "
                           "CUDA device")
    loaded = load_model(resolve_model(config.model), dtype=getattr(torch, config.dtype),
                        device=config.device, quantization=config.quantization)
    max_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                  loaded.config.max_position_embeddings)
    sched = SchedulerConfig(max_model_len=max_len, max_num_seqs=config.max_num_seqs,
                            max_num_batched_tokens=config.max_num_batched_tokens,
                            max_waiting=config.max_waiting)
    return LLMEngine(loaded, config.cache, sched)


class WorkerServer:
    """One worker process's server; `run()` returns after a drained shutdown."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.telemetry = Telemetry(config.tracing)
        self.servicer = WorkerServicer(config, Observability(
            self.telemetry.tracer, None, config.tier, config.worker_id))
        self.metrics: WorkerMetrics | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        """The plaintext health-only port (config.health_port), once bound."""
        self.stopping = asyncio.Event()

    async def _set_health(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> int:
        self.server = grpc.aio.server(options=server_options(),
                                      interceptors=[AioDecodeGuard()])
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = add_port(self.server, f"{self.config.host}:{self.config.port}",
                             self.config.tls)
        if self.config.health_port is not None:
            self.health_server, self.health_port = aio_health_server(
                self.health, f"{self.config.host}:{self.config.health_port}")
        await self._set_health(False)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        return self.port

    async def load(self) -> None:
        start = time.perf_counter()

        def build() -> LLMEngine:
            torch.set_num_threads(self.config.threads)
            return build_engine(self.config)

        # The engine thread loads the model itself (see AsyncEngine); the event loop keeps
        # answering health checks meanwhile.
        aengine = AsyncEngine(build)
        aengine.start()
        engine = await aengine.wait_ready()
        self.metrics = WorkerMetrics(engine.loaded.model_id, self.config.tier,
                                     lambda: aengine.engine)
        self.servicer.observe.metrics = self.metrics
        if self.config.metrics_port is not None:
            self.metrics.serve_http(self.config.metrics_port, self.config.host)
            logger.info("metrics on http://%s:%d/metrics", self.config.host,
                        self.config.metrics_port)
        self.servicer.attach(aengine)
        await self._set_health(True)
        logger.info("worker %s serving %s on port %d (ready in %.1f s)", self.config.worker_id,
                    engine.loaded.model_id, self.port, time.perf_counter() - start)

    async def drain_and_stop(self) -> None:
        """Stops taking requests, lets in-flight ones finish up to the drain timeout, exits."""
        self.servicer.draining = True
        await self._set_health(False)
        engine = self.servicer.engine
        deadline = time.monotonic() + self.config.drain_timeout_s
        while engine is not None and engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if engine is not None and engine.num_in_flight:
            logger.warning("drain timeout: aborting %d requests", engine.num_in_flight)
        await self.server.stop(grace=1.0)
        if self.health_server is not None:  # last: probes see NOT_SERVING through the drain
            await self.health_server.stop(grace=None)
        if engine is not None:
            engine.shutdown()
        self.telemetry.shutdown()  # flushes queued spans (bounded by the export timeout)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        await self.start()
        extra = "" if self.health_port is None else f", health on port {self.health_port}"
        tls = "" if self.config.tls is None else (
            ", mTLS" if self.config.tls.require_client_cert else ", TLS")
        print(f"worker listening on {self.config.host}:{self.port} (loading model{tls}{extra})",
              flush=True)
        load = asyncio.create_task(self.load())
        failure: list[BaseException] = []

        def loaded(task: asyncio.Task) -> None:
            # A worker that cannot load must exit (non-zero) so its supervisor restarts or
            # reports it, instead of staying NOT_SERVING forever.
            if not task.cancelled() and task.exception() is not None:
                failure.append(task.exception())
                logger.error("model load failed: %s", task.exception())
                self.stopping.set()

        load.add_done_callback(loaded)
        await self.stopping.wait()
        if not load.done():
            load.cancel()
        await self.drain_and_stop()
        if failure:
            raise SystemExit(1)
