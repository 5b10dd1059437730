"""Redis persistence of cache entries, with fail-open error handling.

Layout (P = config.key_prefix):
  P e:<id>            HASH  m: answer JSON, q: embedded query text, g: semantic group,
                            v: float32 vector blob; f, c, x: finish ("S"/"L"), completion
                            tokens, request max_tokens (so the exact lookup can check the
                            max_tokens rule inside Redis). Carries the entry's Redis TTL.
  P ix                HASH  id -> JSON [tenant, model_version, prompt_version, group]; the
                            registry of live entries (no TTL), so expired ones can be cleaned up
  P gx                HASH  id -> semantic group, for entries with a vector (index rebuilds)
  P lru:<tenant>      ZSET  id -> logical clock of last store/hit (the tenant's LRU order)
  P mv:<version>      SET   ids by model version;  P pv:<version>  SET  ids by prompt version
  P exp               ZSET  id -> expiry (ms, Redis clock); swept by every replica
  P clock / P count   INT   logical LRU clock / number of live entries
  channel P events    "a|<id>|<group>|<vector>" on store, "d|<id>,<id>,..." on removal

Every mutation is one Lua script, so the bookkeeping stays consistent and each store, touch or
removal is one round trip; the scripts publish their own index events. The scripts build key
names from the prefix, so this layout targets a single Redis (not Redis Cluster). Only e:* keys
carry TTLs: with maxmemory, use a volatile-* policy so Redis never evicts the bookkeeping
(the bookkeeping of entries it evicts is swept at their expiry time, or when a semantic
lookup meets them); under noeviction, a full Redis
refuses stores (dropped, counted) and keeps serving lookups.

Fail-open: every call has a socket timeout (config.redis_timeout_s) and no retries; a failure
raises StoreUnavailable and opens a breaker that fails calls at once for config.redis_retry_s
(or until `ping` succeeds), so a dead or hung Redis costs a Lookup at most one timeout.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.cache.domain import StoreUnavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")
_LUA = (Path(__file__).parent / "scripts.lua").read_text(encoding="utf-8")
_BULK_TIMEOUT_S = 5.0  # rebuild, reconcile, invalidation: not on a request's latency path


@dataclass(frozen=True)
class Record:
    """One entry as written to Redis."""

    entry_id: str
    tenant: str
    model_version: str
    prompt_version: str
    meta: bytes
    finish: str
    """"S" (a STOP answer) or "L" (LENGTH)."""
    completion_tokens: int
    max_tokens: int
    """The max_tokens of the request that produced the answer."""
    query_text: str = ""
    group: str = ""
    vector: bytes = b""


@dataclass(frozen=True)
class Fetched:
    """An entry as read back for serving."""

    meta: bytes
    query_text: str


def _script(name: str, allow_oom: bool) -> str:
    """The shared `lib` section plus the section `name` of scripts.lua, behind a shebang.

    With a shebang Redis checks memory before the script runs: over maxmemory (noeviction),
    scripts without allow-oom (stores) are refused as a whole, while allow-oom ones run:
    lookups, whose only write is the LRU touch, and removals, which free memory.
    """
    pieces = re.split(r"^-- @(\w+)\n", _LUA, flags=re.MULTILINE)
    sections = dict(zip(pieces[1::2], pieces[2::2]))
    shebang = "#!lua flags=allow-oom\n" if allow_oom else "#!lua\n"
    return shebang + sections["lib"] + sections[name]


class RedisStore:
    """Entries in Redis. Thread-safe (redis-py pools connections)."""

    def __init__(self, url: str, prefix: str, timeout_s: float, retry_s: float,
                 on_error: Callable[[str], None] = lambda op: None):
        kw = dict(socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                  health_check_interval=0)
        self._fast = redis.Redis.from_url(url, socket_timeout=timeout_s, **kw)
        self._bulk = redis.Redis.from_url(url, socket_timeout=max(timeout_s, _BULK_TIMEOUT_S), **kw)
        self.prefix = prefix
        self.channel = prefix + "events"
        self._retry_s = retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.available = True
        self._on_error = on_error
        self._store = self._fast.register_script(_script("store", allow_oom=False))
        self._touch = self._fast.register_script(_script("touch", allow_oom=True))
        self._get = self._fast.register_script(_script("get", allow_oom=True))
        self._remove = self._bulk.register_script(_script("remove_ids", allow_oom=True))
        self._sweep = self._bulk.register_script(_script("sweep", allow_oom=True))

    def _k(self, suffix: str) -> str:
        return self.prefix + suffix

    def _run(self, op: str, fn: Callable[[], T], *, probe: bool = False) -> T:
        if not probe and time.monotonic() < self._down_until:
            raise StoreUnavailable(f"redis unavailable ({op} skipped during back-off)")
        try:
            result = fn()
        except redis.ResponseError as e:
            # Redis answered with an error (e.g. OOM under maxmemory): it is up, so no back-off.
            logger.warning("redis %s error: %s", op, e)
            self._on_error(op)
            raise StoreUnavailable(f"redis {op} failed: {e}") from e
        except (redis.RedisError, OSError) as e:
            with self._lock:
                self._down_until = time.monotonic() + self._retry_s
                self.available = False
            self._on_error(op)
            raise StoreUnavailable(f"redis {op} failed: {e}") from e
        if not self.available or self._down_until:
            with self._lock:
                self._down_until = 0.0
                self.available = True
        return result

    def backing_off(self) -> bool:
        """True while calls are skipped after a recent failure."""
        return time.monotonic() < self._down_until

    def ping(self) -> bool:
        """Health probe; always tries Redis, and closes or opens the breaker."""
        try:
            return bool(self._run("ping", self._fast.ping, probe=True))
        except StoreUnavailable:
            return False

    def _store_args(self, rec: Record, ttl_ms: int, max_entries: int) -> list:
        return [self.prefix, rec.entry_id, rec.tenant, rec.model_version, rec.prompt_version,
                rec.group, ttl_ms, max_entries, rec.meta, rec.query_text, rec.vector,
                rec.finish, rec.completion_tokens, rec.max_tokens]

    def put(self, rec: Record, ttl_ms: int, max_entries: int) -> list[str]:
        """Writes an entry (replacing one with the same id); returns ids evicted by the LRU."""
        args = self._store_args(rec, ttl_ms, max_entries)
        evicted = self._run("store", lambda: self._store(args=args))
        return [e.decode() for e in evicted]

    def put_many(self, records: list[Record], ttl_ms: int, max_entries: int) -> list[str]:
        """Writes entries in one pipeline (bulk loads, benchmarks); returns evicted ids."""
        def op() -> list:
            pipe = self._bulk.pipeline(transaction=False)
            for rec in records:
                self._store(args=self._store_args(rec, ttl_ms, max_entries), client=pipe)
            return pipe.execute()
        return [e.decode() for evicted in self._run("store", op) for e in evicted]

    def get_fitting(self, entry_ids: list[str], tenant: str, max_tokens: int,
                    refresh_ttl_ms: int | None) -> tuple[str, bytes] | None:
        """(id, answer JSON) of the first entry that exists and fits max_tokens, marked used
        (one round trip); None if none does."""
        args = [self.prefix, tenant, max_tokens, "1" if refresh_ttl_ms else "0",
                refresh_ttl_ms or 0, *entry_ids]
        found = self._run("get", lambda: self._get(args=args))
        return (found[0].decode(), found[1]) if found else None

    def fetch(self, entry_ids: list[str]) -> list[Fetched | None]:
        """Reads entries for serving, in order; None for a missing (expired/removed) one."""
        def op() -> list:
            pipe = self._fast.pipeline(transaction=False)
            for eid in entry_ids:
                pipe.hmget(self._k("e:" + eid), "m", "q")
            return pipe.execute()
        rows = self._run("fetch", op)
        return [None if m is None else Fetched(m, (q or b"").decode()) for m, q in rows]

    def touch(self, tenant: str, entry_id: str, refresh_ttl_ms: int | None) -> None:
        """Marks an entry used (LRU) and, if refresh_ttl_ms is set, restarts its TTL."""
        args = [self.prefix, tenant, entry_id, "1" if refresh_ttl_ms else "0", refresh_ttl_ms or 0]
        self._run("touch", lambda: self._touch(args=args))

    def remove(self, entry_ids: list[str], tenant_filter: str = "",
               chunk: int = 500) -> list[str]:
        """Removes entries (only the tenant's, if tenant_filter); returns the ids removed."""
        removed: list[str] = []
        for i in range(0, len(entry_ids), chunk):
            args = [self.prefix, tenant_filter, *entry_ids[i : i + chunk]]
            ids = self._run("remove", lambda args=args: self._remove(args=args))
            removed += [e.decode() for e in ids]
        return removed

    def sweep_expired(self, limit: int = 1000) -> list[str]:
        """Removes the bookkeeping of entries whose TTL passed; returns their ids."""
        return [e.decode() for e in self._run("sweep", lambda: self._sweep(args=[self.prefix,
                                                                                 limit]))]

    def tenant_ids(self, tenant: str) -> list[str]:
        """Ids of a tenant's entries."""
        ids = self._run("scan", lambda: self._bulk.zrange(self._k("lru:" + tenant), 0, -1))
        return [i.decode() for i in ids]

    def version_ids(self, kind: str, version: str) -> list[str]:
        """Ids of entries with a model version (kind "mv") or prompt version (kind "pv")."""
        ids = self._run("scan", lambda: self._bulk.smembers(self._k(f"{kind}:{version}")))
        return [i.decode() for i in ids]

    def count(self, tenant: str | None = None) -> int:
        """Live entries of a tenant, or of all tenants (tenant None)."""
        if tenant is None:
            return int(self._run("count", lambda: self._fast.get(self._k("count"))) or 0)
        return int(self._run("count", lambda: self._fast.zcard(self._k("lru:" + tenant))))

    def semantic_ids(self) -> dict[str, str]:
        """id -> group of every live entry that has a vector (HSCAN, non-blocking)."""
        def op() -> dict[str, str]:
            scan = self._bulk.hscan_iter(self._k("gx"), count=2000)
            return {eid.decode(): group.decode() for eid, group in scan}
        return self._run("scan", op)

    def semantic_count(self) -> int:
        """Number of live entries that have a vector."""
        return int(self._run("count", lambda: self._bulk.hlen(self._k("gx"))))

    def vectors(self, entry_ids: list[str], chunk: int = 500) -> Iterator[tuple[str, str, bytes]]:
        """(id, group, float32 blob) of the given entries that still exist."""
        for i in range(0, len(entry_ids), chunk):
            ids = entry_ids[i : i + chunk]

            def op(ids: list[str] = ids) -> list:
                pipe = self._bulk.pipeline(transaction=False)
                for eid in ids:
                    pipe.hmget(self._k("e:" + eid), "g", "v")
                return pipe.execute()
            for eid, (g, v) in zip(ids, self._run("scan", op)):
                if g and v:
                    yield eid, g.decode(), v

    def pubsub(self) -> redis.client.PubSub:
        """A pub/sub connection subscribed to the index event channel (may raise)."""
        ps = self._bulk.pubsub(ignore_subscribe_messages=True)
        ps.subscribe(self.channel)
        return ps

    def close(self) -> None:
        """Closes the connection pools."""
        self._fast.close()
        self._bulk.close()
