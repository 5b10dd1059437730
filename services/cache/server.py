"""Assembly and lifecycle of one cache replica: store, index, sync, gRPC server."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc

from services.cache.cache import ResponseCache
from services.cache.config import CacheConfig
from services.cache.embedder import Embedder, load_minilm
from services.cache.guard import SemanticGuard
from services.cache.index import VectorIndex
from services.cache.metrics import CacheMetrics
from services.cache.servicer import CacheServicer
from services.cache.store import RedisStore
from services.cache.sync import IndexSync
from services.common.decode_guard import DecodeGuard
from services.common.grpc_options import server_options
from services.common.health_port import sync_health_server
from services.common.telemetry import Telemetry
from services.common.tls import add_port

logger = logging.getLogger(__name__)

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


def load_embedder(config: CacheConfig) -> Embedder:
    """Loads all-MiniLM-L6-v2 (from config.model_dir, else the packaged copy)."""
    from services.common.assets import minilm_dir

    return load_minilm(config.model_dir or minilm_dir(), dtype=config.embed_dtype,
                       lru_size=config.embedding_cache_size)


class CacheReplica:
    """The cache without gRPC: ResponseCache plus the index sync threads."""

    def __init__(self, config: CacheConfig, embedder: Embedder,
                 guard: SemanticGuard | None = None):
        self.config = config
        self.metrics = CacheMetrics()
        self.store = RedisStore(config.redis_url, config.key_prefix, config.redis_timeout_s,
                                config.redis_retry_s, on_error=self.metrics.redis_error)
        self.index = VectorIndex(embedder.dim, exact_scan_max=config.exact_scan_max)
        self.cache = ResponseCache(config, self.store, self.index, embedder,
                                   guard or SemanticGuard.default(), self.metrics)
        self.sync = IndexSync(self.store, self.index, self.metrics,
                              probe_interval_s=config.probe_interval_s,
                              sweep_interval_s=config.sweep_interval_s,
                              reconcile_interval_s=config.reconcile_interval_s)

    def start(self) -> None:
        """Rebuilds the index from Redis and starts syncing."""
        self.sync.start()

    def stop(self) -> None:
        """Stops syncing and closes Redis connections."""
        self.sync.stop()
        self.store.close()


class CacheServer:
    """A CacheReplica behind gRPC (CacheService, health, reflection)."""

    def __init__(self, config: CacheConfig, embedder: Embedder,
                 guard: SemanticGuard | None = None):
        self.config = config
        self.replica = CacheReplica(config, embedder, guard)
        self.telemetry = Telemetry(config.tracing())
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(config.grpc_workers,
                                                             thread_name_prefix="cache-rpc"),
                                  options=server_options(), interceptors=[DecodeGuard()])
        cache_pb2_grpc.add_CacheServiceServicer_to_server(CacheServicer(self.replica.cache,
                                                                        self.telemetry.tracer),
                                                          self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = add_port(self.server, f"{config.host}:{config.port}", config.tls(), "tls_")
        if self.port == 0:
            raise RuntimeError(f"cannot bind {config.host}:{config.port}")
        self.health_server: grpc.Server | None = None
        self.health_port: int | None = None
        """The plaintext health-only port (config.health_port), once bound."""
        if config.health_port is not None:
            self.health_server, self.health_port = sync_health_server(
                self.health, f"{config.host}:{config.health_port}")

    def _set_health(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> int:
        """Rebuilds the index, starts serving; returns the bound port."""
        self._set_health(False)
        self.replica.start()
        if self.config.metrics_port:
            self.replica.metrics.serve_http(self.config.metrics_port)
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        self._set_health(True)
        logger.info("cache serving on %s:%d (redis %s, %d vectors indexed)", self.config.host,
                    self.port, self.config.redis_url, len(self.replica.index))
        return self.port

    def stop(self, grace_s: float = 2.0) -> None:
        """Stops serving (in-flight RPCs get `grace_s`) and the replica."""
        self._set_health(False)
        self.server.stop(grace_s).wait()
        if self.health_server is not None:  # last: probes see NOT_SERVING until the end
            self.health_server.stop(None).wait()
        self.replica.stop()
        self.telemetry.shutdown()

    def wait(self) -> None:
        """Blocks until the server stops."""
        self.server.wait_for_termination()
