"""Replica choice within a tier: prefix affinity first, power-of-two choices otherwise.

Affinity: requests whose shared prefix (system prompt, or the start of a raw prompt) is the
same prefer one replica, chosen by rendezvous hashing over the tier's available replicas, so
its prefix cache is reused; every router instance agrees without coordination, and when a
replica leaves only its own keys move. The affinity replica yields to P2C when its load score
exceeds the least loaded candidate's by more than `affinity_slack`, or its waiting queue is
full.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from services.router.config import BalancerConfig
from services.router.domain import Tier
from services.router.replicas import Replica, ReplicaPool


@dataclass(frozen=True)
class Choice:
    replica: Replica
    reason: str
    """"affinity", "affinity yielded (overloaded)", "p2c" or "only"."""


def _weight(key: bytes, replica: Replica) -> bytes:
    return hashlib.blake2b(key + b"|" + replica.address.encode(), digest_size=8).digest()


class Balancer:
    def __init__(self, pool: ReplicaPool, config: BalancerConfig, rng: random.Random | None = None):
        self.pool = pool
        self.config = config
        self.rng = rng or random.Random()

    def pick(self, tier: Tier, affinity_text: str, exclude: set[Replica]) -> Choice | None:
        """A replica of `tier` not in `exclude`, or None when none is available."""
        candidates = [r for r in self.pool.available(tier) if r not in exclude]
        if not candidates:
            return None
        if len(candidates) == 1:
            return Choice(candidates[0], "only")
        yielded = False
        if self.config.affinity and len(affinity_text) >= self.config.min_affinity_chars:
            key = hashlib.blake2b(affinity_text.encode(), digest_size=16).digest()
            preferred = max(candidates, key=lambda r: _weight(key, r))
            if not self._overloaded(preferred, candidates):
                return Choice(preferred, "affinity")
            yielded = True
        a, b = self.rng.sample(candidates, 2)
        best = a if a.score() <= b.score() else b
        return Choice(best, "affinity yielded (overloaded)" if yielded else "p2c")

    def _overloaded(self, replica: Replica, candidates: list[Replica]) -> bool:
        load = replica.load
        if load is not None and load.max_waiting and load.num_waiting >= load.max_waiting:
            return True
        least = min(r.score() for r in candidates)
        return replica.score() > least + self.config.affinity_slack
