"""`python -m services.cli router --config router.yaml`: the router as deployed.

The same router as `python -m services.router`, plus the two things a deployment adds:
- API keys from the environment: SWITCHYARD_API_KEYS_<TENANT> (comma-separated; on
  Kubernetes from the Secret) fill each tenant's `api_keys`, so keys never sit in a ConfigMap.
- Per-pod discovery: every replica entry `name:port` is resolved (services/cli/discovery.py)
  at start and every `resolve_interval_s`; the router gets one replica per address. A replica
  whose address disappears leaves the rotation at once; its channel closes when its in-flight
  requests end (a terminating pod leaves DNS while it still drains them).

The ReplicaSync below adds and retires `Replica` objects of the running router's pool. It uses
the pool's public `by_tier` lists and the server's replica-change hook; it belongs in
services/router/replicas.py as `ReplicaPool.set_addresses(tier, addresses)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from services.cli import discovery
from services.cli.render import api_keys_var

logger = logging.getLogger(__name__)


def load_router_data(path: str | Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The router YAML as a dict, with tenants' keys filled from SWITCHYARD_API_KEYS_*."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for name, tenant in (data.get("tenants") or {}).items():
        raw = env.get(api_keys_var(str(name)))
        if raw is not None:
            tenant = dict(tenant or {})
            tenant["api_keys"] = [k.strip() for k in raw.split(",") if k.strip()]
            data["tenants"][name] = tenant
        elif not (tenant or {}).get("api_keys"):
            raise ValueError(f"tenants.{name}.api_keys: not in the file and "
                             f"{api_keys_var(str(name))} is not set")
    return data


async def resolve_tiers(data: dict[str, Any]) -> dict[str, list[str]]:
    """Tier name -> configured entries (names), and rewrites `data`'s replicas to addresses.
    A name that resolves to nothing yet stays as it is (gRPC resolves it on its own)."""
    names: dict[str, list[str]] = {}
    for tier, spec in (data.get("tiers") or {}).items():
        entries = list((spec or {}).get("replicas") or [])
        names[str(tier)] = entries
        resolved = [a for e in entries for a in (await discovery.resolve(e) or [e])]
        spec["replicas"] = list(dict.fromkeys(resolved))
    return names


class ReplicaSync:
    """Keeps a running router's replicas equal to what the configured names resolve to."""

    def __init__(self, server, names: dict[str, list[str]], interval_s: float):
        from services.router.domain import Tier

        self.server = server
        self.names = {Tier.parse(t): entries for t, entries in names.items()}
        self.interval_s = interval_s
        self._retiring: set[asyncio.Task] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sync_once()

    async def sync_once(self) -> None:
        for tier, entries in self.names.items():
            found: list[str] = []
            for entry in entries:
                found.extend(await discovery.resolve(entry))
            if found:  # nothing resolved: a DNS hiccup is no reason to empty a tier
                self.apply(tier, list(dict.fromkeys(found)))

    def apply(self, tier, addresses: list[str]) -> None:
        from services.router.replicas import Replica

        pool, cfg = self.server.pool, self.server.config
        replicas = pool.by_tier.setdefault(tier, [])
        current = {r.address for r in replicas}
        for address in addresses:
            if address not in current:
                r = Replica(address, tier, cfg.balancer, cfg.health,
                            self.server._on_replica_change, cfg.tls.workers)
                r.start()
                replicas.append(r)
                logger.info("discovered %s replica %s", tier.label, address)
        for r in [r for r in replicas if r.address not in addresses]:
            replicas.remove(r)  # out of rotation now; closed once its requests end
            logger.info("%s replica %s left discovery; retiring it", tier.label, r.address)
            task = asyncio.create_task(self._retire(r))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, replica) -> None:
        # Closing the channel under a live request would cancel it locally, which the router's
        # handler sees as its own cancellation (the client then waits for its deadline): wait
        # for the requests to end instead, at most as long as any request may last.
        deadline = time.monotonic() + self.server.config.request_timeout_s
        while replica.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await replica.close()
        with contextlib.suppress(KeyError):
            self.server.metrics.replica_available.remove(replica.tier.label, replica.address)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()


async def serve(data: dict[str, Any], resolve_interval_s: float, drain_s: float) -> None:
    """Runs the router until SIGTERM / SIGINT, then drains for up to `drain_s`."""
    from services.router.config import RouterConfig
    from services.router.server import RouterServer

    names = await resolve_tiers(data)
    config = RouterConfig.from_dict(data)
    server = RouterServer(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    grpc_port, http_port = await server.start()
    print(f"router listening on {config.host}:{grpc_port} (gRPC) and {config.host}:{http_port} "
          f"(HTTP)", flush=True)
    sync = ReplicaSync(server, names, resolve_interval_s)
    task = asyncio.create_task(sync.run(), name="replica discovery")
    await stopping.wait()
    logger.info("SIGTERM: draining for up to %.0f s", drain_s)
    task.cancel()
    await sync.close()
    await server.stop(grace_s=drain_s)
