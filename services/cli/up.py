"""`switchyard up`: the whole cluster on this machine, from one cluster config.

Processes (each with its rendered settings, as on Kubernetes):
  redis     redis-server on redis.port (unless redis.url points elsewhere)
  cache     python -m services.cache, configured by SWITCHYARD_CACHE_* variables
  <tier>-i  python -m services.worker --config <run>/worker-<tier>.yaml per replica
  router    python -m services.cli router --config <run>/router.yaml
Workers and Redis start at once; the cache once Redis answers; the router once every worker
and the cache are SERVING. Shutdown runs the other way: router, workers, cache, Redis.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import render
from services.cli.config import ClusterConfig
from services.cli.supervisor import ProcessSpec, StartupFailed, Supervisor


def grpc_ready(target: str):
    """A probe: the grpc.health.v1 overall status is SERVING."""
    async def probe() -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                resp = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    return probe


def redis_ready(host: str, port: int):
    """A probe: Redis answers PING."""
    async def probe() -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
        except (TimeoutError, OSError):
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
        finally:
            writer.close()
    return probe


def build_specs(config: ClusterConfig, run_dir: Path, env: dict[str, str],
                python: str = sys.executable) -> list[ProcessSpec]:
    """Every process of the cluster, with its settings written under `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    base = {**env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}
    one_thread = {**base, "OMP_NUM_THREADS": "1"}  # cache and router embed on one thread
    host = config.host
    specs: list[ProcessSpec] = []
    if config.redis.url is None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise FileNotFoundError("redis-server is not installed (scripts/setup.sh installs "
                                    "it), and redis.url is not set")
        specs.append(ProcessSpec("redis", (
            redis, "--port", str(config.redis.port), "--bind", host, "--save", "",
            "--appendonly", "no", "--dir", str(run_dir)), redis_ready(host, config.redis.port),
            base))
    if config.cache.enabled:
        specs.append(ProcessSpec(
            "cache", (python, "-m", "services.cache"), grpc_ready(f"{host}:{config.cache.port}"),
            {**one_thread, **render.cache_env(config, render.LOCAL)},
            needs=("redis",) if config.redis.url is None else ()))
    workers = []
    for tier in config.tiers:
        path = run_dir / f"worker-{tier.name}.yaml"
        path.write_text(render.dump_yaml(render.worker_settings(config, tier, render.LOCAL)))
        threads = str(tier.worker.get("threads", 1))
        ports = zip(tier.local_ports(), tier.local_metrics_ports(), strict=True)
        for i, (port, metrics) in enumerate(ports):
            name = f"{tier.name}-{i}"
            argv = [python, "-m", "services.worker", "--config", str(path), "--port", str(port),
                    "--worker-id", name]
            if metrics is not None:
                argv += ["--metrics-port", str(metrics)]
            specs.append(ProcessSpec(name, tuple(argv), grpc_ready(f"{host}:{port}"),
                                     {**base, "OMP_NUM_THREADS": threads}))
            workers.append(name)
    router_yaml = run_dir / "router.yaml"
    router_yaml.write_text(render.dump_yaml(render.router_settings(config, render.LOCAL)))
    router_yaml.chmod(0o600)  # it holds the API keys
    specs.append(ProcessSpec(
        "router", (python, "-m", "services.cli", "router", "--config", str(router_yaml),
                   "--drain-s", str(config.router.drain_timeout_s),
                   "--resolve-interval-s", str(config.router.discovery_interval_s)),
        grpc_ready(f"{host}:{config.router.grpc_port}"), one_thread,
        needs=tuple(workers) + (("cache",) if config.cache.enabled else ())))
    return specs


def stop_order(specs: list[ProcessSpec]) -> list[list[str]]:
    """Router first, then every worker together, then the cache, then Redis."""
    fixed = {"router", "cache", "redis"}
    workers = [s.name for s in specs if s.name not in fixed]
    return [["router"], workers, ["cache"], ["redis"]]


def endpoints(config: ClusterConfig) -> list[str]:
    h, r = config.host, config.router
    lines = [f"router gRPC     {h}:{r.grpc_port}   (switchyard ask \"...\")",
             f"OpenAI HTTP     http://{h}:{r.http_port}/v1",
             f"router metrics  http://{h}:{r.http_port}/metrics"]
    for t in config.tiers:
        ports = zip(t.local_ports(), t.local_metrics_ports(), strict=True)
        for i, (p, m) in enumerate(ports):
            extra = f"   metrics http://{h}:{m}/metrics" if m else ""
            name = f"{t.name}-{i}"
            lines.append(f"worker {name:<8} {h}:{p}   {t.model} ({t.quantization}){extra}")
    if config.cache.enabled:
        m = config.cache.metrics_port
        lines.append(f"cache           {h}:{config.cache.port}" +
                     (f"   metrics http://{h}:{m}/metrics" if m else ""))
    lines.append(f"redis           {render.redis_url(config, render.LOCAL)}")
    tenant, spec = next(iter(config.tenants.items()))
    lines.append(f"API key         {spec['api_keys'][0]}  (tenant {tenant})")
    return lines


async def run_up(config: ClusterConfig, run_dir: Path, env: dict[str, str],
                 out: TextIO = sys.stdout) -> int:
    """Runs the cluster until SIGINT / SIGTERM; 0 after a clean stop, 1 if start-up failed.
    A second signal kills everything at once."""
    specs = build_specs(config, run_dir, env)
    sup = Supervisor(specs, config.supervisor, stop_order(specs), out)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            sup.log.info("second signal: killing every process")
            sup.kill_all()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    starting = asyncio.create_task(sup.start())
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and not stop.is_set():
            try:
                starting.result()
            except StartupFailed as exc:
                sup.log.info(f"start-up failed: {exc}")
                return 1
            sup.log.info(f"Switchyard is up (supervisor pid {os.getpid()}). Endpoints:")
            for line in endpoints(config):
                sup.log.info("  " + line)
            sup.log.info("Ctrl-C stops it (router first; workers drain).")
        await stopped
        return 0
    finally:  # whatever happened, no process outlives the supervisor
        starting.cancel()
        stopped.cancel()
        await sup.stop()
