"""Worker replicas: live load from WatchLoad, ejection on failure, health probes to readmit.

Each Replica keeps one WatchLoad stream open. A snapshot with serving=true makes it eligible;
serving=false (loading, draining) makes it ineligible without ejecting it. A broken stream or a
failed dispatch ejects it: it is skipped until a grpc.health.v1 probe (after probe_interval_s,
doubling up to max_probe_interval_s) answers SERVING, then the stream is reopened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common.grpc_options import channel_options
from services.common.tls import ClientTls, aio_channel
from services.router.config import BalancerConfig, HealthConfig, RouterConfig
from services.router.domain import Tier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadSnapshot:
    """The parts of a worker Load the router uses."""

    worker_id: str
    model_id: str
    num_running: int
    num_waiting: int
    max_waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    serving: bool

    @classmethod
    def from_pb(cls, m: worker_pb2.Load) -> LoadSnapshot:
        return cls(m.worker_id, m.model_id, m.num_running, m.num_waiting, m.max_waiting,
                   m.kv_blocks_free, m.kv_blocks_total, m.serving)


class Replica:
    """One worker replica as the router sees it."""

    def __init__(self, address: str, tier: Tier, balancer: BalancerConfig,
                 health: HealthConfig, on_change: Callable[[Replica], None] | None = None,
                 tls: ClientTls | None = None):
        """`tls`: TLS / mTLS of the channel to the worker (config tls.workers)."""
        self.address = address
        self.tier = tier
        self.balancer = balancer
        self.health_cfg = health
        self.channel = aio_channel(address, channel_options(health.keepalive), tls, "tls.workers.")
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.load: LoadSnapshot | None = None
        self.ejected = False
        self.in_flight = 0
        """Requests this router has in flight on the replica."""
        self._in_flight_at_snapshot = 0
        self._task: asyncio.Task | None = None
        self._on_change = on_change or (lambda r: None)
        self.ejections = 0
        self._ejected_signal: asyncio.Future | None = None
        self.last_snapshot_at: float | None = None
        """time.monotonic() of the last load snapshot."""

    @property
    def name(self) -> str:
        """worker_id once known, else host:port."""
        return self.load.worker_id if self.load and self.load.worker_id else self.address

    @property
    def model_id(self) -> str:
        return self.load.model_id if self.load else ""

    @property
    def available(self) -> bool:
        return not self.ejected and self.load is not None and self.load.serving

    def score(self) -> float:
        """Load score (lower is better): the last snapshot plus what this router sent since."""
        load = self.load
        if load is None:
            return float("inf")
        b = self.balancer
        kv_used = 1.0 - load.kv_blocks_free / load.kv_blocks_total if load.kv_blocks_total else 0
        since = max(0, self.in_flight - self._in_flight_at_snapshot)
        return (load.num_running + b.waiting_weight * load.num_waiting + b.kv_weight * kv_used
                + since)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"replica {self.address}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close(grace=None)

    def ejected_signal(self) -> asyncio.Future:
        """A future that completes when the replica is next ejected (shared by waiters; never
        cancel it). Dispatch races a call's first message against it."""
        if self._ejected_signal is None or self._ejected_signal.done():
            self._ejected_signal = asyncio.get_running_loop().create_future()
        return self._ejected_signal

    def _mark_ejected(self, why: str) -> None:
        self.ejected = True
        self.ejections += 1
        logger.warning("ejecting replica %s (%s tier): %s", self.name, self.tier.label, why)
        if self._ejected_signal is not None and not self._ejected_signal.done():
            self._ejected_signal.set_result(why)
        self._on_change(self)

    def eject(self, why: str) -> None:
        """Takes the replica out of rotation until a health probe brings it back."""
        if self.ejected:
            return
        self._mark_ejected(why)
        if self._task is not None:
            self._task.cancel()  # the run loop restarts in probing mode
            self._task = asyncio.create_task(self._run(), name=f"replica {self.address}")

    def _on_snapshot(self, load: LoadSnapshot) -> None:
        was = self.available
        self.load = load
        self.last_snapshot_at = time.monotonic()
        self._in_flight_at_snapshot = self.in_flight
        if was != self.available:
            self._on_change(self)

    async def _run(self) -> None:
        delay = self.health_cfg.probe_interval_s
        while True:
            if self.ejected:
                await asyncio.sleep(delay)
                if not await self._probe():
                    delay = min(delay * 2, self.health_cfg.max_probe_interval_s)
                    continue
                logger.info("replica %s passed its health probe; readmitting", self.name)
                self.ejected = False
                delay = self.health_cfg.probe_interval_s
            why = await self._watch()
            # The stream ended: the worker went away, is shutting down, or never answered.
            if not self.ejected:
                self._mark_ejected(why)

    async def _probe(self) -> bool:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                            timeout=self.health_cfg.probe_timeout_s)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            return False

    async def _watch(self) -> str:
        """Follows WatchLoad until it ends; returns why it ended."""
        call = self.stub.WatchLoad(worker_pb2.WatchLoadRequest(
            interval_ms=self.balancer.load_interval_ms))
        stale_s = self.health_cfg.load_stale_after_s
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(call.read(), stale_s)
                except asyncio.TimeoutError:
                    return f"no load snapshot for {stale_s:g} s (worker frozen or unreachable)"
                if msg is grpc.aio.EOF:
                    return "load stream ended (worker shutting down)"
                self._on_snapshot(LoadSnapshot.from_pb(msg))
        except grpc.aio.AioRpcError as exc:
            return f"WatchLoad failed: {exc.code().name} {exc.details()}"
        finally:
            call.cancel()


class ReplicaPool:
    """Every configured replica, by tier."""

    def __init__(self, config: RouterConfig,
                 on_change: Callable[[Replica], None] | None = None):
        self.by_tier: dict[Tier, list[Replica]] = {
            t.tier: [Replica(a, t.tier, config.balancer, config.health, on_change,
                             config.tls.workers) for a in t.replicas] for t in config.tiers}

    def all(self) -> list[Replica]:
        return [r for rs in self.by_tier.values() for r in rs]

    def replicas(self, tier: Tier) -> list[Replica]:
        return self.by_tier.get(tier, [])

    def available(self, tier: Tier) -> list[Replica]:
        return [r for r in self.replicas(tier) if r.available]

    def start(self) -> None:
        for r in self.all():
            r.start()

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.all()))

    async def wait_available(self, timeout_s: float, tiers: list[Tier] | None = None) -> bool:
        """Waits until every replica (of `tiers`, default all) is available."""
        deadline = time.monotonic() + timeout_s
        want = [r for r in self.all() if tiers is None or r.tier in tiers]
        while not all(r.available for r in want):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True
