"""The supervisor of `switchyard up`, on stand-in processes (small Python scripts): start order,
readiness, log prefixes, restart with backoff, ordered stop, SIGKILL after the stop timeout."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from services.cli.config import SupervisorSpec
from services.cli.discovery import resolve
from services.cli.supervisor import ProcessSpec, StartupFailed, Supervisor

# A stand-in service: says hello, turns "ready" (a file) after a delay, records SIGTERM in a
# shared journal and exits (or ignores SIGTERM when told to).
SERVICE = r"""
import os, signal, sys, time
name, folder, delay, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
def on_term(*_):
    with open(os.path.join(folder, "journal"), "a") as f:
        f.write(f"{name} {time.monotonic()}\n")
    if mode != "ignore-term":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print(f"hello from {name} pid {os.getpid()}", flush=True)
if mode == "fail":
    sys.exit(3)
time.sleep(delay)
open(os.path.join(folder, name + ".ready"), "w").write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""

POLICY = SupervisorSpec(ready_timeout_s=20, stop_timeout_s=1.5, restart_backoff_s=0.2,
                        max_restart_backoff_s=1.0, stable_after_s=60)


def spec(tmp: Path, name: str, delay: float = 0.1, mode: str = "ok",
         needs: tuple[str, ...] = ()) -> ProcessSpec:
    script = tmp / "service.py"
    script.write_text(SERVICE)
    ready_file = tmp / f"{name}.ready"

    async def ready() -> bool:
        return ready_file.exists()
    return ProcessSpec(name, (sys.executable, str(script), name, str(tmp), str(delay), mode),
                       ready, dict(os.environ), needs)


def journal(tmp: Path) -> list[str]:
    path = tmp / "journal"
    lines = path.read_text().split("\n") if path.exists() else []
    return [line.split()[0] for line in lines if line]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_order_logs_restart_and_ordered_stop(tmp_path):
    async def scenario():
        specs = [spec(tmp_path, "router", needs=("worker-a", "worker-b", "cache")),
                 spec(tmp_path, "worker-a", delay=0.5), spec(tmp_path, "worker-b"),
                 spec(tmp_path, "cache", needs=("redis",)), spec(tmp_path, "redis")]
        out = io.StringIO()
        sup = Supervisor(specs, POLICY, [["router"], ["worker-a", "worker-b"], ["cache"],
                                         ["redis"]], out, progress_every_s=0.2)
        await sup.start()
        m = sup.procs
        assert all(p.ready for p in m.values())
        # The router started only after everything it needs was ready.
        assert m["router"].started_at >= m["worker-a"].started_at + 0.4
        # A crashed worker is restarted (new pid) after the backoff, and turns ready again.
        first = m["worker-b"].pid
        (tmp_path / "worker-b.ready").unlink()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not (m["worker-b"].restarts == 1 and m["worker-b"].ready):
            assert time.monotonic() < deadline, out.getvalue()
            await asyncio.sleep(0.05)
        assert m["worker-b"].pid != first
        pids = [p.pid for p in m.values()]
        await sup.stop()
        return out.getvalue(), pids

    log, pids = asyncio.run(scenario())
    assert "worker-a | hello from worker-a" in log
    assert "worker-b crashed (signal SIGKILL); restarting in 0.2 s (restart 1)" in log
    assert "waiting" in log and "router (queued)" in log
    order = journal(tmp_path)
    assert order[0] == "router" and set(order[1:3]) == {"worker-a", "worker-b"}
    assert order[3:] == ["cache", "redis"]
    assert not any(alive(pid) for pid in pids)


def test_a_process_that_dies_before_ready_fails_the_start(tmp_path):
    async def scenario():
        sup = Supervisor([spec(tmp_path, "redis"), spec(tmp_path, "worker", mode="fail")],
                         POLICY, [["worker"], ["redis"]], io.StringIO())
        try:
            with pytest.raises(StartupFailed, match="worker exited before it was ready"):
                await sup.start()
        finally:
            await sup.stop()
        return sup.procs["worker"].restarts, sup.procs["redis"].pid

    restarts, redis_pid = asyncio.run(scenario())
    assert restarts == 0  # a config error must not crash-loop
    assert not alive(redis_pid)


def test_sigterm_is_followed_by_sigkill_after_the_stop_timeout(tmp_path):
    async def scenario():
        sup = Supervisor([spec(tmp_path, "stubborn", mode="ignore-term")], POLICY,
                         [["stubborn"]], io.StringIO())
        await sup.start()
        began = time.monotonic()
        await sup.stop()
        return time.monotonic() - began, sup.procs["stubborn"].proc.returncode

    took, rc = asyncio.run(scenario())
    assert journal(tmp_path) == ["stubborn"]  # it got SIGTERM first
    assert rc == -signal.SIGKILL and POLICY.stop_timeout_s <= took < POLICY.stop_timeout_s + 2


def test_discovery_resolves_a_name_to_every_address():
    async def scenario():
        return (await resolve("10.1.2.3:50061"), await resolve("[::1]:7"),
                await resolve("localhost:50061"), await resolve("no-such-host.invalid:1"))

    literal, v6, local, missing = asyncio.run(scenario())
    assert literal == ["10.1.2.3:50061"] and v6 == ["[::1]:7"]
    assert "127.0.0.1:50061" in local
    assert missing == []
