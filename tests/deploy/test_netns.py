"""Many hosts, simulated: router, cache (with its Redis) and two workers each on a host of its
own (network namespaces, tests/deploy/netns.py), configured exactly as the Kubernetes
manifests configure them: the files `switchyard render-config --target k8s` writes, the same
commands and environment, and workers found through the name `worker-small`, which each host's
/etc/hosts resolves to both worker addresses (standing in for the headless Service's DNS).

Requests are served by both workers; then one worker host is cut off (its link goes down:
silent packet loss) and drops out of the name's records, as Kubernetes drops a pod from its
Service once the node is NotReady. Every later request must still be answered, by the other
worker. Skipped only where network namespaces cannot be created.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc

from services.cli import render
from services.cli.config import ClusterConfig, check_service_configs
from tests.deploy import netns

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-netns-0123456789"
DRAIN_S = 3.0


@pytest.fixture(scope="module")
def network():
    try:
        netns.probe()
    except netns.NetnsUnavailable as exc:
        pytest.skip(f"multi-host test needs network namespaces: {exc}")
    net = netns.Network()
    try:
        yield net
    finally:
        net.close()


def cluster(model: Path) -> ClusterConfig:
    config = ClusterConfig.from_dict({
        "cache": {"port": 50070, "metrics_port": None, "settings": {"grpc_workers": 2}},
        "router": {"grpc_port": 50051, "http_port": 8080, "drain_timeout_s": DRAIN_S,
                   "discovery_interval_s": 1, "settings": {
                       "health": {"probe_interval_s": 0.2, "max_probe_interval_s": 1.0},
                       "balancer": {"load_interval_ms": 100, "affinity": False},
                       "classifier": {"enabled": False, "default_tier": "small"}}},
        "worker_defaults": {"threads": 1, "max_model_len": 512, "drain_timeout_s": 2,
                            "cache": {"num_blocks": 128}},
        "tiers": {"small": {"model": str(model), "port": 50061, "replicas": 2}},
        "tenants": {"netns": {"api_keys": [KEY]}},
    })
    check_service_configs(config, render.K8S)
    return config


def env_file(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    return dict(pairs)


class Cluster:
    """The five processes on four hosts, started as the manifests start them."""

    def __init__(self, net: netns.Network, config: ClusterConfig, tmp: Path):
        self.net, self.tmp = net, tmp
        files = render.render_k8s(config, "test")
        etc = tmp / "etc-switchyard"  # stands in for the ConfigMap mounted at /etc/switchyard
        render.write_files(files, etc)
        h = {n: net.add_host(n, octet) for n, octet in
             (("router", 10), ("cache", 11), ("worker-a", 21), ("worker-b", 22))}
        self.hosts = h
        self.dns = [(h["cache"].address, "cache"), (h["cache"].address, "redis"),
                    (h["worker-a"].address, "worker-small"),
                    (h["worker-b"].address, "worker-small"), (h["router"].address, "router")]
        for host in h.values():
            net.set_hosts_file(host, self.dns)
        base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                    SWITCHYARD_LOG_LEVEL="INFO")
        py = sys.executable
        redis = shutil.which("redis-server")
        assert redis, "redis-server is missing (scripts/setup.sh installs it)"
        self.procs: dict[str, subprocess.Popen] = {}
        self._start("redis", h["cache"], [redis, "--port", "6379", "--bind", "0.0.0.0",
                                          "--protected-mode", "no", "--save", "",
                                          "--appendonly", "no"], base)
        self._start("cache", h["cache"], [py, "-m", "services.cache"],
                    {**base, **env_file(files["cache.env"])})
        for name in ("worker-a", "worker-b"):  # the Deployment's command and args
            self._start(name, h[name], [py, "-m", "services.worker", "--config",
                                        str(etc / "worker-small.yaml"), "--worker-id",
                                        f"worker-small-{name[-1]}"], base)
        self._start("router", h["router"], [
            py, "-m", "services.cli", "router", "--config", str(etc / "router.yaml"),
            "--drain-s", str(DRAIN_S), "--resolve-interval-s", "1"],
            {**base, **env_file(files["api-keys.env"])})
        self.target = f"{h['router'].address}:50051"
        self.metrics_url = f"http://{h['router'].address}:8080/metrics"

    def _start(self, name: str, host: netns.Host, argv: list[str], env: dict) -> None:
        self.procs[name] = self.net.popen(host, argv, self.tmp / f"{name}.log", env, str(ROOT))

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.tmp / f"{n}.log").read_text()[-2500:]
                         for n in self.procs)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"exited: {dead}\n{self.logs()}"

    def available_replicas(self) -> set[str]:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return set()
        return {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("switchyard_router_replica_available{")
                and line.endswith(" 1.0")}

    def wait_available(self, want: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.available_replicas() != want:
            self.check_alive()
            assert time.monotonic() < deadline, (f"replicas {self.available_replicas()} != "
                                                 f"{want}\n{self.logs()}")
            time.sleep(0.3)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def generate(stub, prompt: str, cached: bool, timeout_s: float = 30.0):
    """One request; returns (its RouteInfo, seconds)."""
    req = router_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex, max_tokens=4, tier_hint=common_pb2.TIER_SMALL,
        chat=common_pb2.Conversation(messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)]),
        sampling=common_pb2.SamplingParams(temperature=0.0),
        cache=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_ENABLED if cached
                                     else common_pb2.CACHE_MODE_DISABLED))
    began = time.monotonic()
    final = None
    for resp in stub.Generate(req, timeout=timeout_s,
                              metadata=(("authorization", f"Bearer {KEY}"),)):
        if resp.WhichOneof("kind") == "final":
            final = resp.final
    assert final is not None
    return final.route, time.monotonic() - began


def ask(stub, i: int) -> tuple[str, float]:
    """A request that a worker answers (cache off); returns (replica, seconds)."""
    route, took = generate(stub, f"Count to {i}.", cached=False)
    return route.replica, took


def wait_cache_hit(stub, c: Cluster, timeout_s: float) -> None:
    """The same greedy prompt until the answer comes from the cache (router -> cache host ->
    its Redis, all by name): the first is stored, a later one is an exact hit."""
    deadline = time.monotonic() + timeout_s
    while generate(stub, "Name a colour.", cached=True)[0].cache_result != \
            common_pb2.CACHE_RESULT_EXACT:
        c.check_alive()
        assert time.monotonic() < deadline, c.logs()
        time.sleep(0.5)


def test_a_worker_host_cut_off_leaves_the_other_serving(network, tiny_models, tmp_path):
    config = cluster(tiny_models["small"])
    c = Cluster(network, config, tmp_path)
    try:
        a, b = c.hosts["worker-a"], c.hosts["worker-b"]
        c.wait_available({f"{a.address}:50061", f"{b.address}:50061"}, 240)
        with grpc.insecure_channel(c.target) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            served = set()
            for i in range(40):  # power-of-two choices: both show up within a few requests
                served.add(ask(stub, i)[0])
                if len(served) == 2:
                    break
            assert served == {"worker-small-a", "worker-small-b"}, served
            wait_cache_hit(stub, c, 240)

            network.cut_off(b)
            # What Kubernetes does once b's node is NotReady: its record leaves the Service.
            # The router re-resolves the name every second and retires b.
            network.set_hosts_file(c.hosts["router"], [e for e in c.dns if e[0] != b.address])
            c.wait_available({f"{a.address}:50061"}, 10)
            answers = [ask(stub, 100 + i) for i in range(8)]
        assert {r for r, _ in answers} == {"worker-small-a"}, answers
        c.check_alive()
        assert "left discovery; retiring it" in (tmp_path / "router.log").read_text()
    finally:
        network.reconnect(c.hosts["worker-b"])  # lets the cut connections close cleanly
        c.stop()
