"""A plaintext port that serves only grpc.health.v1, beside a TLS main port.

Kubernetes' native gRPC probes speak plaintext and present no client certificate, so they
cannot check a TLS (let alone mTLS) port. A service with TLS therefore also serves its health
on `health_port`. That server holds the *same* HealthServicer as the main port, so both answer
with one status (NOT_SERVING while loading or draining), and it registers nothing else: the
plaintext port must not become a way around TLS to the real services.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from services.common.grpc_options import server_options


def aio_health_server(servicer: health.aio.HealthServicer,
                      address: str) -> tuple[grpc.aio.Server, int]:
    """An asyncio server (not started) with only `servicer` on plaintext `address`; returns
    it and the bound port. Call from the event loop that runs the main server."""
    server = grpc.aio.server(options=server_options())
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server, server.add_insecure_port(address)


def sync_health_server(servicer: health.HealthServicer,
                       address: str) -> tuple[grpc.Server, int]:
    """The thread-pool counterpart of `aio_health_server` (for the cache service)."""
    # Two threads: probes are rare and answer from memory.
    server = grpc.server(futures.ThreadPoolExecutor(2, thread_name_prefix="health"),
                         options=server_options())
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server, server.add_insecure_port(address)
