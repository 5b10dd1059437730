"""The CPU KV pool's memory: lazily zeroed pages by default, all faulted in with `prefault`."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import model_runner as mr
from services.worker.engine.config import CacheConfig


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


SIZE = 64 * 2**20


@pytest.mark.parametrize("prefault", [False, True])
def test_prefault_commits_the_pool_up_front(prefault):
    before = _rss_bytes()
    pool = mr._zeros((SIZE // 4,), torch.float32, torch.device("cpu"), prefault=prefault)
    grown = _rss_bytes() - before
    if prefault:
        assert grown >= 0.95 * SIZE, f"only {grown / 2**20:.1f} MiB of 64 faulted in"
    else:
        assert grown < 0.1 * SIZE, f"{grown / 2**20:.1f} MiB resident before any write"
    assert int(pool[:: 4096].count_nonzero()) == 0  # zeroed either way
    pool[-1] = 1.0  # and writable to the end
    assert float(pool[-1]) == 1.0


def test_prefault_is_on_by_default_and_can_be_turned_off():
    assert CacheConfig().prefault is True
    assert CacheConfig(prefault=False).prefault is False
