"""Keeping a replica's vector index equal to Redis, and Redis's bookkeeping tidy.

Several cache replicas share one Redis; each holds its own in-process index. Chosen scheme:
Redis pub/sub plus periodic reconciliation.
- Every store/removal script publishes an event on `<prefix>events` atomically with the write:
  "a|<id>|<group>|<vector>" (the vector travels in the message, so applying it needs no extra
  read) or "d|<id>,...". A subscriber thread applies them; a store on one replica is searchable
  on the others within milliseconds.
- Pub/sub is at-most-once (events published while a replica is disconnected are lost), so the
  index is reconciled against the registry `<prefix>gx` (id -> group) at start (the rebuild)
  and after every reconnect of the subscriber or recovery of Redis. Every
  reconcile_interval_s the index size is compared with the registry's (HLEN), and a full
  reconcile runs when they differ: scanning 100k ids costs ~0.3 s of the process's CPU.
  A Redis stream would replay missed events, but would need trimming and per-replica cursors;
  reconciliation is needed anyway (Redis restarts without persistence lose everything).
- A maintenance thread probes Redis (PING), sweeps expired entries' bookkeeping (entries
  expire by Redis TTL; the sweep drops their ids from the index sets and tells every replica),
  and runs the reconciliations.
Stale vectors are harmless: a lookup reads the candidate from Redis and drops it if missing.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import redis

from services.cache.index import VectorIndex
from services.cache.metrics import CacheMetrics
from services.cache.store import RedisStore

logger = logging.getLogger(__name__)


class IndexSync:
    """Background threads keeping `index` in sync with `store` (see module docstring)."""

    def __init__(self, store: RedisStore, index: VectorIndex, metrics: CacheMetrics, *,
                 probe_interval_s: float, sweep_interval_s: float, reconcile_interval_s: float):
        self.store = store
        self.index = index
        self.metrics = metrics
        self._probe_s = probe_interval_s
        self._sweep_s = sweep_interval_s
        self._reconcile_s = reconcile_interval_s
        self._stop = threading.Event()
        self._need_reconcile = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Rebuilds the index from Redis (if reachable), then starts the background threads."""
        t0 = time.perf_counter()
        try:
            # Subscribe first so no event falls between the rebuild's scan and the subscription.
            pubsub = self.store.pubsub()
        except (redis.RedisError, OSError) as e:
            logger.warning("redis unreachable at start (%s); serving misses until it is", e)
            pubsub = None
        self.metrics.redis_up.set(0 if pubsub is None else 1)
        if pubsub is not None and self.reconcile():
            logger.info("index rebuilt from redis: %d vectors in %.2f s", len(self.index),
                        time.perf_counter() - t0)
        else:
            self._need_reconcile.set()
        for name, fn in (("cache-events", lambda: self._events(pubsub)),
                         ("cache-maintenance", self._maintenance)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stops the threads (returns within about a second)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)

    def reconcile(self) -> bool:
        """Makes the index equal to Redis's registry. Returns False if Redis failed."""
        have = self.index.ids()  # before the scan: a concurrent add must not look extra
        try:
            want = self.store.semantic_ids()
            for entry_id in have - want.keys():
                self.index.remove(entry_id)
            missing = [e for e in want if e not in have]
            batch: list[tuple[str, str, bytes]] = []
            for row in self.store.vectors(missing):
                batch.append(row)
                if len(batch) == 1000:
                    self._add_batch(batch)
                    batch = []
            self._add_batch(batch)
        except Exception as e:  # noqa: BLE001 - any failure: retry on the next round
            logger.warning("index reconcile failed: %s", e)
            return False
        self.metrics.index_vectors.set(len(self.index))
        return True

    def _add_batch(self, rows: list[tuple[str, str, bytes]]) -> None:
        if rows:
            vecs = np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v in rows])
            self.index.add_many([r[0] for r in rows], [r[1] for r in rows], vecs)

    def apply(self, data: bytes) -> None:
        """Applies one index event from the channel."""
        kind, _, rest = data.partition(b"|")
        if kind == b"a":
            entry_id, group, blob = rest.split(b"|", 2)
            self.index.add(entry_id.decode(), group.decode(),
                           np.frombuffer(blob, dtype=np.float32))
        elif kind == b"d":
            for entry_id in rest.decode().split(","):
                self.index.remove(entry_id)
        else:
            logger.warning("unknown index event %r", data[:40])

    def _events(self, pubsub: redis.client.PubSub | None) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.store.pubsub()
                    self._need_reconcile.set()  # events were lost while unsubscribed
                    backoff = 0.05
                msg = pubsub.get_message(timeout=0.2)
                if msg and msg["type"] == "message":
                    self.apply(msg["data"])
            except (redis.RedisError, OSError, ValueError) as e:
                logger.debug("index event subscription lost: %s", e)
                self.metrics.redis_error("pubsub")
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001 - the connection is already broken
                        pass
                pubsub = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
        if pubsub is not None:
            pubsub.close()

    def _maintenance(self) -> None:
        tick = min(self._probe_s, self._sweep_s, 0.1)
        next_probe = next_sweep = 0.0
        next_reconcile = time.monotonic() + self._reconcile_s
        up = self.store.available
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now >= next_probe:
                next_probe = now + self._probe_s
                was_up, up = up, self.store.ping()
                self.metrics.redis_up.set(1 if up else 0)
                if up and not was_up:
                    logger.info("redis is back; reconciling the index")
                    self._need_reconcile.set()
            if not up:
                continue
            if now >= next_sweep:
                next_sweep = now + self._sweep_s
                self._sweep()
            if now >= next_reconcile:
                next_reconcile = now + self._reconcile_s
                if self._count_differs():
                    self._need_reconcile.set()
            if self._need_reconcile.is_set():
                self._need_reconcile.clear()
                if not self.reconcile():
                    self._need_reconcile.set()

    def _count_differs(self) -> bool:
        try:
            return self.store.semantic_count() != len(self.index)
        except Exception:  # noqa: BLE001 - the probe reports the outage
            return False

    def _sweep(self) -> None:
        try:
            expired = self.store.sweep_expired()
            self.metrics.entries.set(self.store.count())
        except Exception as e:  # noqa: BLE001 - the probe reports the outage
            logger.debug("sweep failed: %s", e)
            return
        for entry_id in expired:
            self.index.remove(entry_id)
        self.metrics.evicted("expired", len(expired))
