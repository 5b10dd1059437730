"""Per-tenant limits: concurrent requests and tokens per minute (a token bucket).

A request reserves its worst case (estimated prompt tokens + max_tokens) from the bucket on
admission; when it ends, the difference from its real usage goes back. A request whose worst
case exceeds the whole minute's budget can never pass and is refused at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.router.config import TenantConfig
from services.router.errors import RateLimited

CHARS_PER_TOKEN = 4
"""Prompt-size estimate before tokenization (the worker tokenizes); corrected on settle."""


def estimate_prompt_tokens(chars: int) -> int:
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


class TokenBucket:
    """Holds up to `per_minute` tokens, refilled continuously at per_minute / 60 per second."""

    def __init__(self, per_minute: int, clock: Callable[[], float]):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = float(per_minute)
        self.clock = clock
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self, n: float) -> float | None:
        """Takes n tokens; returns None on success, else seconds until n are available."""
        self._refill()
        if n <= self.level:
            self.level -= n
            return None
        return (n - self.level) / self.rate

    def give_back(self, n: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + n)

    def charge(self, n: float) -> None:
        """Takes n tokens even into debt (usage beyond the reservation)."""
        self._refill()
        self.level -= n


@dataclass
class Ticket:
    """An admitted request's hold on its tenant's limits; `release` exactly once."""

    limiter: TenantLimiter
    reserved: int
    released: bool = False

    def release(self, used_tokens: int | None) -> None:
        """Frees the concurrency slot and settles tokens (None = unknown: keep the
        reservation, e.g. after a failure mid-stream)."""
        if self.released:
            return
        self.released = True
        self.limiter.in_flight -= 1
        bucket = self.limiter.bucket
        if bucket is not None and used_tokens is not None:
            diff = self.reserved - used_tokens
            if diff > 0:
                bucket.give_back(diff)
            elif diff < 0:
                bucket.charge(-diff)


class TenantLimiter:
    def __init__(self, tenant: TenantConfig, clock: Callable[[], float]):
        self.tenant = tenant
        self.in_flight = 0
        self.bucket = (TokenBucket(tenant.tokens_per_minute, clock)
                       if tenant.tokens_per_minute else None)

    def admit(self, tokens: int) -> Ticket:
        """Admits a request reserving `tokens`, or raises RateLimited naming the limit."""
        t = self.tenant
        if t.max_concurrent is not None and self.in_flight >= t.max_concurrent:
            raise RateLimited("max_concurrent",
                              f"tenant {t.name!r} has {self.in_flight} requests in flight; "
                              f"limit max_concurrent={t.max_concurrent}", retry_after_s=1.0)
        if self.bucket is not None:
            if tokens > self.bucket.capacity:
                raise RateLimited(
                    "tokens_per_minute",
                    f"request needs up to {tokens} tokens (prompt estimate + max_tokens), over "
                    f"tenant {t.name!r}'s limit tokens_per_minute={t.tokens_per_minute}; "
                    "lower max_tokens", retry_after_s=60.0)
            wait = self.bucket.try_take(tokens)
            if wait is not None:
                raise RateLimited(
                    "tokens_per_minute",
                    f"tenant {t.name!r} is over its limit tokens_per_minute="
                    f"{t.tokens_per_minute} (request needs up to {tokens} tokens); retry in "
                    f"{wait:.1f} s", retry_after_s=wait)
        self.in_flight += 1
        return Ticket(self, tokens if self.bucket is not None else 0)


class Limits:
    """All tenants' limiters. Single-threaded: used from the router's event loop only."""

    def __init__(self, tenants: list[TenantConfig],
                 clock: Callable[[], float] = time.monotonic):
        self._limiters = {t.name: TenantLimiter(t, clock) for t in tenants}

    def admit(self, tenant: str, tokens: int) -> Ticket:
        return self._limiters[tenant].admit(tokens)

    def in_flight(self, tenant: str) -> int:
        return self._limiters[tenant].in_flight
