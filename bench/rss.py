"""Resident memory of processes over time, for soak runs: samples of VmRSS from
/proc/<pid>/status and a least-squares trend in MB/hour (Linux only)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np


def rss_mb(pid: int) -> float | None:
    """The process's resident set in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None  # the process is gone
    return None


async def sample_rss(pids: dict[str, int], interval_s: float, into: dict[str, list]) -> None:
    """Appends (seconds since start, MB) to `into[name]` every `interval_s` until cancelled."""
    t0 = time.monotonic()
    while True:
        t = time.monotonic() - t0
        for name, pid in pids.items():
            mb = rss_mb(pid)
            if mb is not None:
                into.setdefault(name, []).append((t, mb))
        await asyncio.sleep(interval_s)


def slope_mb_per_h(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of MB over hours; None with fewer than 3 samples."""
    if len(samples) < 3:
        return None
    t, mb = np.array(samples).T
    return float(np.polyfit(t / 3600.0, mb, 1)[0])


def memory_report(series: dict[str, list]) -> dict:
    """Per process: first, last and largest MB, the slope over all samples and over the second
    half (past the warm-up allocations: the one that shows a leak), and the samples."""
    out = {}
    for name, samples in series.items():
        mb = [m for _, m in samples]
        half = samples[len(samples) // 2:]
        out[name] = {"first_mb": mb[0], "last_mb": mb[-1], "max_mb": max(mb),
                     "slope_mb_per_h": slope_mb_per_h(samples),
                     "slope_2nd_half_mb_per_h": slope_mb_per_h(half),
                     "samples": [[round(t, 1), round(m, 2)] for t, m in samples]}
    return out
