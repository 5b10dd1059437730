"""SLO evaluation of one finished request against its tier's targets."""

from __future__ import annotations

from dataclasses import dataclass

from services.router.config import SloTargets


@dataclass(frozen=True)
class Latency:
    """What one request experienced at the router, in milliseconds."""

    ttft_ms: float
    e2e_ms: float
    tpot_ms: float | None
    """Mean time per output token after the first; None with at most one token."""

    @classmethod
    def measure(cls, ttft_ms: float, e2e_ms: float, completion_tokens: int) -> Latency:
        tpot = (e2e_ms - ttft_ms) / (completion_tokens - 1) if completion_tokens > 1 else None
        return cls(ttft_ms, e2e_ms, tpot)


def meets(latency: Latency, targets: SloTargets) -> bool:
    """Goodput: TTFT and TPOT both within target (TPOT vacuously for <= 1 token)."""
    tpot_ok = latency.tpot_ms is None or latency.tpot_ms <= targets.tpot_ms
    return latency.ttft_ms <= targets.ttft_ms and tpot_ok
