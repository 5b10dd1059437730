"""`switchyard up` end to end, as a real process on tiny models: it starts Redis, the cache, two
worker tiers and the router, answers through `switchyard ask`, restarts a worker killed with
SIGKILL, and on SIGTERM stops everything in order and exits 0 with no child left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

KEY = "sk-uptest-0123456789"
SWITCHYARD = str(Path(sys.executable).with_name("switchyard"))  # the [project.scripts] entry


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def children(pid: int) -> dict[int, str]:
    """Direct children of `pid`: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmd
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


class Up:
    """`switchyard up` in the background, its output in a file."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log_path = config, log
        env = dict(os.environ, OMP_NUM_THREADS="1", SWITCHYARD_LOG_LEVEL="WARNING")
        self.proc = subprocess.Popen([SWITCHYARD, "up", "--config", str(config)],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            assert self.proc.poll() is None, f"switchyard up exited:\n{self.log()[-4000:]}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout_s} s:\n" \
                                                f"{self.log()[-4000:]}"
            time.sleep(0.2)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([SWITCHYARD, *args, "--config", str(self.config)], input=stdin,
                              capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def cluster_config(tmp_path_factory, tiny_models) -> Path:
    tmp = tmp_path_factory.mktemp("up")
    small, large = tiny_models["small"], tiny_models["large"]
    redis, cache, grpc_port, http_port, p_small, p_large = free_ports(6)
    config = {
        "redis": {"port": redis},
        "cache": {"port": cache, "metrics_port": None, "settings": {"grpc_workers": 2}},
        "router": {"grpc_port": grpc_port, "http_port": http_port, "drain_timeout_s": 2,
                   "discovery_interval_s": 2, "settings": {
                       "health": {"probe_interval_s": 0.2, "max_probe_interval_s": 1.0},
                       "classifier": {"enabled": False, "default_tier": "small"}}},
        "worker_defaults": {"threads": 1, "max_model_len": 512, "drain_timeout_s": 2,
                            "cache": {"num_blocks": 128}},
        "tiers": {"small": {"model": str(small), "quantization": "int8", "port": p_small},
                  "large": {"model": str(large), "port": p_large}},
        "tenants": {"test": {"api_keys": [KEY]}},
        "supervisor": {"ready_timeout_s": 240, "stop_timeout_s": 15, "restart_backoff_s": 0.5},
    }
    path = tmp / "switchyard.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_up_serves_restarts_and_stops_cleanly(cluster_config, tmp_path):
    up = Up(cluster_config, tmp_path / "up.log")
    try:
        up.wait_for("Switchyard is up", 240)
        kids = children(up.proc.pid)
        assert len(kids) == 5, kids  # redis, cache, small-0, large-0, router
        ask = up.cli("ask", "Say hi.", "--tier", "small", "--max-tokens", "8")
        assert ask.returncode == 0, ask.stderr
        assert "route: tier small | replica small-0" in ask.stdout
        assert "cache miss" in ask.stdout and "TTFT" in ask.stdout
        chat = up.cli("chat", "--max-tokens", "4", stdin="Hi!\nAnd again?\n")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.count("route: tier small") == 2  # two turns, one conversation
        status = up.cli("status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "small-0" in status.stdout and "serving" in status.stdout
        assert "SLO attainment, small: 3 of 3" in status.stdout

        # A worker killed outright comes back, and the router sends to it again.
        victim = next(pid for pid, cmd in kids.items() if "--worker-id small-0" in cmd)
        os.kill(victim, signal.SIGKILL)
        up.wait_for("small-0 crashed (signal SIGKILL); restarting", 20)
        up.wait_for("after restart 1", 90)
        deadline = time.monotonic() + 30
        while True:
            ask = up.cli("ask", f"Hello again {time.monotonic()}", "--tier", "small",
                         "--max-tokens", "4")
            if ask.returncode == 0 and "replica small-0" in ask.stdout:
                break
            assert time.monotonic() < deadline, ask.stdout + ask.stderr
            time.sleep(0.5)
        kids = children(up.proc.pid)

        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=90) == 0, up.log()[-4000:]
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()
    log = up.log()
    stops = [line.split("stopping ", 1)[1] for line in log.splitlines()
             if "| stopping " in line]
    groups = [set(s.split(", ")) for s in stops]
    assert groups == [{"router"}, {"small-0", "large-0"}, {"cache"}, {"redis"}], stops
    assert "all processes stopped" in log
    assert all(gone(pid) for pid in kids), {p: c for p, c in kids.items() if not gone(p)}
