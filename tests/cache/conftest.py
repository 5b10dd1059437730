"""Fixtures of the cache tests: a real redis-server on a free port, one shared embedder.

Each test gets its own key prefix, so tests sharing the session's Redis never see each other's
entries. Tests that kill Redis start a private one (`redis_factory`). Never touches port 6379.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch

from services.cache.config import CacheConfig
from services.cache.domain import Answer, FinishReason, Message, Query, Role, Sampling, Scope, Usage
from services.cache.embedder import MiniLMEmbedder
from services.cache.server import CacheReplica

torch.set_num_threads(1)

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
DATA_DIR = Path(__file__).parent / "data"
FUNCTIONAL_TIMEOUT_S = 2.0  # Redis socket timeout of tests that assert a healthy Redis's answers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process on a fixed free port; can be killed and restarted."""

    def __init__(self, tmp: Path):
        self.port = free_port()
        assert self.port != 6379
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp), "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        """SIGKILL: an abrupt crash (all data is lost: no persistence)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: Redis hangs (connections stay open, nothing answers)."""
        assert self.proc is not None
        self.proc.send_signal(19)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(18)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path) -> Iterator[Callable[[], RedisServer]]:
    """Starts private Redis servers (for tests that kill them); stops them afterwards."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        s = RedisServer(tmp_path)
        s.start()
        servers.append(s)
        return s
    yield make
    for s in servers:
        if s.proc is not None:
            s.resume() if s.proc.poll() is None else None
        s.stop()


@pytest.fixture(scope="session")
def embedder() -> MiniLMEmbedder:
    """One MiniLM for the whole session (loading takes ~6 s)."""
    from services.cache.server import load_embedder

    return load_embedder(CacheConfig())  # type: ignore[return-value]


@pytest.fixture
def config(redis_server) -> CacheConfig:
    """Fast-cycling settings on the session Redis, with a fresh key prefix.

    The Redis timeout is FUNCTIONAL_TIMEOUT_S, not the served 50 ms: these tests assert what a
    healthy Redis answers, and on a loaded 2-core CI machine a loopback call can stall past 50 ms
    (seen: one timeout opens the breaker and the next stores answer "unavailable"). The tests of
    the timeout itself (test_fail_open.py) set the served value back.
    """
    return CacheConfig(redis_url=redis_server.url, key_prefix=f"t{uuid.uuid4().hex[:8]}:",
                       port=0, probe_interval_s=0.05, sweep_interval_s=0.05,
                       redis_retry_s=0.2, reconcile_interval_s=5.0,
                       redis_timeout_s=FUNCTIONAL_TIMEOUT_S)


@pytest.fixture
def make_replica(embedder) -> Iterator[Callable[..., CacheReplica]]:
    """Builds started CacheReplicas (config overrides as keywords); stops them afterwards."""
    replicas: list[CacheReplica] = []

    def make(config: CacheConfig, **overrides) -> CacheReplica:
        r = CacheReplica(dataclasses.replace(config, **overrides), embedder)
        r.start()
        replicas.append(r)
        return r
    yield make
    for r in replicas:
        r.stop()


def chat(text: str, *, tenant: str = "acme", system: str = "You are helpful.",
         history: tuple[Message, ...] = (), temperature: float | None = 0.0,
         max_tokens: int = 64, **scope) -> Query:
    """A chat query factory: system prompt, optional earlier turns, then `text` as the user."""
    msgs = (Message(Role.SYSTEM, system), *history, Message(Role.USER, text))
    return Query(scope=Scope(tenant=tenant, model_id=scope.pop("model_id", "smollm2"),
                             model_version=scope.pop("model_version", "v1"), **scope),
                 messages=msgs, sampling=Sampling(temperature=temperature),
                 max_tokens=max_tokens)


def answer(text: str = "Paris.", completion_tokens: int = 3,
           finish: FinishReason = FinishReason.STOP) -> Answer:
    """An answer factory."""
    return Answer(text=text, token_ids=(1, 2, 3), usage=Usage(10, completion_tokens, 0),
                  tier=1, model_id="smollm2", finish_reason=finish, stop_reason="2")


def read_pairs(name: str) -> list[tuple[str, str, str]]:
    """(category, stored, query) rows of tests/cache/data/<name>.tsv."""
    lines = [ln for ln in (DATA_DIR / name).read_text().splitlines()
             if ln and not ln.startswith("#")]
    rows = [tuple(ln.split("\t")) for ln in lines[1:]]
    assert all(len(r) == 3 for r in rows), name
    return rows  # type: ignore[return-value]


def wait_for(pred: Callable[[], bool], timeout: float = 2.0, step: float = 0.01) -> bool:
    """Polls `pred` until true or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return pred()
        time.sleep(step)
    return True
