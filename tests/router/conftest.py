"""Fixtures of the router tests: real workers (tiny random Llamas with SmolLM2's tokenizer,
and SmolLM2 itself), the real cache service on a private Redis, and routers, all over loopback.

Workers and routers run in-process, each on its own event-loop thread (`LoopThread`), so they
start in well under a second once their model is built; tests drive them with ordinary sync
gRPC stubs and the `openai` client. One session-wide cluster serves most tests:

  small:     two tiny workers (seed 0)       large: one tiny worker (seed 1)
  quantized: an address where nothing listens (never healthy: exercises fallback)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.router.config import RouterConfig
from services.router.server import RouterServer
from tests.cache.conftest import RedisServer
from tests.worker.conftest import smollm2_gguf_reader, smollm2_tokenizer  # noqa: F401 (fixtures)

KEYS = {"acme": "sk-acme-0000000001", "limited": "sk-limited-000001",
        "nohint": "sk-nohint-0000001", "smallonly": "sk-smallonly-0001",
        "cascade": "sk-cascade-000001", "picky": "sk-picky-00000001"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An asyncio event loop on a daemon thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Worker:
    """`python -m services.worker` as a child process, with a sync stub to inspect it.

    Workers run as processes, not in the test process: the worker's attention metadata
    (services/worker/model/attention.py forward_context) is process-global, so two engines
    stepping in one process trip its no-nesting assertion.
    """

    def __init__(self, model: str, worker_id: str, tier: str = "small", port: int = 0,
                 tmp: Path | None = None, extra_args: tuple[str, ...] = (),
                 settings: dict[str, Any] | None = None, log_level: str = "WARNING",
                 client_tls=None):
        """`extra_args`: more `python -m services.worker` flags (later ones win); `settings`:
        WorkerConfig fields for its --config file (tls, health_port, tracing, ...);
        `client_tls`: what the test's channel presents (services.common.tls.ClientTls)."""
        self.model, self.worker_id, self.tier = model, worker_id, tier
        self.extra_args, self.log_level, self.client_tls = extra_args, log_level, client_tls
        # WatchLoad every 50 ms (the CLI has no flag for it; a --config file does).
        self.settings = {"load_interval_ms": 50, "min_load_interval_ms": 20, **(settings or {})}
        self.config_path = (tmp or Path("/tmp")) / f"worker-{worker_id}-{uuid.uuid4().hex[:6]}.yaml"
        self.port = port
        self.output: list[str] = []
        """Every line the process printed (kept for tests that inspect it)."""
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        import yaml

        from services.common.tls import sync_channel

        self.config_path.write_text(yaml.safe_dump(self.settings))
        env = dict(os.environ, OMP_NUM_THREADS="1", SWITCHYARD_LOG_LEVEL=self.log_level)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.worker", "--config", str(self.config_path),
             "--model", self.model, "--tier", self.tier, "--worker-id", self.worker_id,
             "--port", str(self.port), "--threads", "1", "--max-model-len", "1024",
             "--block-size", "16", "--num-kv-blocks", "256", "--drain-timeout-s", "2",
             *self.extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        # At DEBUG, log lines may come first; the process exits (EOF) if it cannot start.
        for line in self.proc.stdout:
            self.output.append(line)
            if "listening on" in line:
                break
        else:
            raise AssertionError(f"worker {self.worker_id} did not start:\n{self.text()}")
        self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        threading.Thread(target=self._echo, daemon=True).start()
        self.channel = sync_channel(self.address, [], self.client_tls)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)

    def _echo(self) -> None:
        for line in self.proc.stdout:  # keep the pipe drained; show worker errors
            self.output.append(line)
            sys.stderr.write(f"[{self.worker_id}] {line}")

    def text(self) -> str:
        """Everything the process printed so far."""
        return "".join(self.output)

    def wait_serving(self, timeout: float = 120.0) -> None:
        from services.worker.client import wait_serving

        wait_serving(self.channel, timeout)

    def load(self) -> worker_pb2.Load:
        return self.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)

    def wait_idle(self, timeout: float = 15.0) -> worker_pb2.Load:
        """Waits for no requests and every KV block free (aborted requests gave theirs back)."""
        deadline = time.monotonic() + timeout
        while True:
            load = self.load()
            if (load.num_running, load.num_waiting, load.kv_blocks_free) == (
                    0, 0, load.kv_blocks_total):
                return load
            assert time.monotonic() < deadline, f"worker {self.worker_id} not idle: {load}"
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the worker dies abruptly."""
        self.channel.close()
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_workers(specs: list[tuple[str, str, str]], tmp: Path) -> list[Worker]:
    """Starts (model, worker_id, tier) workers in parallel; returns them once serving."""
    workers = [Worker(model, wid, tier, tmp=tmp) for model, wid, tier in specs]
    for w in workers:
        w.wait_serving()
    return workers


def build_tiny_model(folder: Path, tokenizer, seed: int) -> Path:
    """A tiny random Llama (2 layers) with SmolLM2's tokenizer, as an HF folder."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tokenizer.chat_template,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_tokenizer) -> dict[int, Path]:  # noqa: F811
    """Tiny random checkpoints by seed (0: the small tier, 1: the large tier)."""
    return {seed: build_tiny_model(tmp_path_factory.mktemp(f"tiny-{seed}"), smollm2_tokenizer,
                                   seed) for seed in (0, 1)}


@pytest.fixture(scope="session")
def classifier():
    """One difficulty classifier for every router of the session (loads in ~0.5 s)."""
    from services.common.assets import minilm_dir
    from services.router.classifier import DifficultyClassifier

    return DifficultyClassifier.load(minilm_dir())


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("router-redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def cache_target(redis_url) -> Iterator[str]:
    """The real cache service (gRPC, in-process threads) on the session's Redis.

    Its MiniLM is built straight from the safetensors file (as the router's classifier does)
    instead of through sentence-transformers, which only adds ~6 s of import and a load-time
    self-check; the embedding math is the cache's own (_FastMiniLM, bf16, as in production).
    """
    import torch

    from services.cache.config import CacheConfig
    from services.cache.embedder import MiniLMEmbedder
    from services.cache.server import CacheServer
    from services.common.assets import minilm_dir
    from services.router.classifier.embedder import build_minilm

    fast = build_minilm(minilm_dir(), max_tokens=256, dtype=torch.bfloat16)
    fast.warm_up(32)
    config = CacheConfig(redis_url=redis_url, key_prefix=f"rt{uuid.uuid4().hex[:6]}:", port=0,
                         grpc_workers=4, probe_interval_s=0.1, sweep_interval_s=0.5,
                         redis_timeout_s=2.0)  # not 50 ms: a CI stall must not turn hits to misses
    server = CacheServer(config, MiniLMEmbedder(fast, dim=384))
    port = server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0.5)


def router_config(tiers: dict[str, list[str]], *, cache_target: str | None = None,
                  tenants: dict | None = None, **extra) -> RouterConfig:
    """A RouterConfig dict-built like the YAML file, with the standard tenants."""
    data = {
        "grpc_port": 0, "http_port": 0, "max_attempts": 3,
        "tiers": {name: {"replicas": addrs, "slo": {"ttft_ms": 2000, "tpot_ms": 500}}
                  for name, addrs in tiers.items()},
        "tenants": tenants or {
            "acme": {"api_keys": [KEYS["acme"]]},
            "limited": {"api_keys": [KEYS["limited"]], "max_concurrent": 1,
                        "tokens_per_minute": 600},
            "nohint": {"api_keys": [KEYS["nohint"]], "allow_tier_hint": False},
            "smallonly": {"api_keys": [KEYS["smallonly"]], "allowed_tiers": ["small"]},
            "cascade": {"api_keys": [KEYS["cascade"]], "cascade": True},
            "picky": {"api_keys": [KEYS["picky"]],
                      "thresholds": {"quantized_at": 0.0, "large_at": 0.0}},
        },
        "health": {"probe_interval_s": 0.1, "max_probe_interval_s": 0.5},
        "balancer": {"load_interval_ms": 50},
    }
    if not {"small", "large"} <= set(tiers):
        data["tenants"].pop("cascade", None)
    if cache_target:
        data["cache"] = {"target": cache_target, "timeout_ms": 500}
    data.update(extra)
    return RouterConfig.from_dict(data)


@dataclasses.dataclass
class RunningRouter:
    server: RouterServer
    loop: LoopThread
    channel: grpc.Channel

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}/v1"

    def openai(self, tenant: str = "acme", **kw):
        import openai

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base_url, api_key=KEYS[tenant], **kw)

    def metrics(self) -> str:
        return self.server.metrics.exposition().decode()


@pytest.fixture(scope="session")
def make_router(classifier) -> Iterator[Callable[[RouterConfig], RunningRouter]]:
    """Starts routers on one shared loop thread; waits for their live replicas."""
    loop = LoopThread("routers")
    routers: list[RunningRouter] = []

    def make(config: RouterConfig) -> RunningRouter:
        server = RouterServer(config, classifier=classifier)
        loop.run(server.start(), 30)
        live = [t for t, rs in server.pool.by_tier.items()
                if all(_listening(r.address) for r in rs)]
        assert loop.run(server.pool.wait_available(30, live), 40), "replicas not available"
        r = RunningRouter(server, loop, grpc.insecure_channel(
            f"127.0.0.1:{server.grpc_port}"))
        routers.append(r)
        return r
    yield make
    for r in routers:
        r.channel.close()
        with contextlib.suppress(Exception):
            loop.run(r.server.stop(0.5), 10)
    loop.stop()


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="session")
def cluster(tiny_models, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Two small workers, one large worker, and a quantized address nobody serves."""
    small0, small1, large0 = start_workers(
        [(str(tiny_models[0]), "small-0", "small"), (str(tiny_models[0]), "small-1", "small"),
         (str(tiny_models[1]), "large-0", "large")], tmp_path_factory.mktemp("workers"))
    small, large = [small0, small1], [large0]
    dead = f"127.0.0.1:{free_port()}"
    yield {"small": small, "large": large, "quantized_dead": dead}
    for w in small + large:
        w.stop()


@pytest.fixture(scope="session")
def router(cluster, make_router, cache_target) -> RunningRouter:
    """The session router over `cluster`, with the cache."""
    config = router_config({"small": [w.address for w in cluster["small"]],
                            "quantized": [cluster["quantized_dead"]],
                            "large": [w.address for w in cluster["large"]]},
                           cache_target=cache_target)
    return make_router(config)
