"""Each service's settings, rendered from the cluster config for one target.

Two targets share every rule except addresses:
  local  (`switchyard up`): everything binds `config.host`; replica i of a tier listens on
         port + i; Redis is `redis.url` or the local redis-server; API keys go in router.yaml.
  k8s    (the ConfigMap): everything binds 0.0.0.0; workers are found through their headless
         Service `worker-<tier>:<port>` (the router resolves it to one replica per pod); Redis
         is the `redis` StatefulSet unless `redis.url` is set; API keys go in a Secret read as
         SWITCHYARD_API_KEYS_<TENANT> variables, never in the ConfigMap.

`switchyard render-config --target k8s --out DIR` writes what the kustomization's
configMapGenerator and secretGenerator read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from services.cli.config import ClusterConfig, TierSpec

LOCAL = "local"
K8S = "k8s"
TARGETS = (LOCAL, K8S)

K8S_REDIS_URL = "redis://redis:6379/0"
"""The redis StatefulSet's Service (deploy/k8s/base/redis.yaml)."""
K8S_CACHE_HOST = "cache"
"""The cache's Service (deploy/k8s/base/cache.yaml)."""
CACHE_ENV_PREFIX = "SWITCHYARD_CACHE_"
"""Read by services/cache/__main__.py, one variable per CacheConfig field."""
API_KEYS_ENV_PREFIX = "SWITCHYARD_API_KEYS_"
"""Read by the router launcher (services/cli/router_main.py): comma-separated keys."""


def worker_service(tier: str) -> str:
    """Name of a tier's Deployment and headless Service on Kubernetes."""
    return f"worker-{tier}"


def api_keys_var(tenant: str) -> str:
    return API_KEYS_ENV_PREFIX + tenant.upper().replace("-", "_").replace(".", "_")


def quantization_supported() -> bool:
    """Whether this checkout's worker takes a `quantization` setting yet."""
    from services.worker.config import WorkerConfig

    return "quantization" in {f.name for f in dataclasses.fields(WorkerConfig)}


def _bind(config: ClusterConfig, target: str) -> str:
    return config.host if target == LOCAL else "0.0.0.0"


def _tracing(config: ClusterConfig) -> dict[str, Any] | None:
    t = config.tracing
    if t.exporter == "none":
        return None
    out: dict[str, Any] = {"exporter": t.exporter, "sample_ratio": t.sample_ratio}
    if t.otlp_endpoint:
        out["otlp_endpoint"] = t.otlp_endpoint
    return out


def worker_settings(config: ClusterConfig, tier: TierSpec, target: str) -> dict[str, Any]:
    """A worker's `--config` YAML (WorkerConfig fields). Locally, the supervisor adds
    --port / --metrics-port / --worker-id per replica; on Kubernetes --worker-id is the pod."""
    s: dict[str, Any] = {"model": tier.model, "tier": tier.name, **tier.worker,
                         "host": _bind(config, target), "port": tier.port}
    if tier.metrics_port is not None:
        s["metrics_port"] = tier.metrics_port
    if quantization_supported():
        s["quantization"] = tier.quantization
    tracing = _tracing(config)
    if tracing is not None:
        s["tracing"] = tracing
    return s


def replica_addresses(config: ClusterConfig, tier: TierSpec, target: str) -> list[str]:
    if target == LOCAL:
        return [f"{config.host}:{p}" for p in tier.local_ports()]
    return [f"{worker_service(tier.name)}:{tier.port}"]


def cache_target(config: ClusterConfig, target: str) -> str:
    host = config.host if target == LOCAL else K8S_CACHE_HOST
    return f"{host}:{config.cache.port}"


def redis_url(config: ClusterConfig, target: str) -> str:
    if config.redis.url:
        return config.redis.url
    return f"redis://{config.host}:{config.redis.port}/0" if target == LOCAL else K8S_REDIS_URL


def router_settings(config: ClusterConfig, target: str,
                    placeholder_keys: bool = False) -> dict[str, Any]:
    """The router's YAML (services/router/config.py). k8s: tenants carry no keys (the Secret
    does); `placeholder_keys` fills stand-ins so the result can be validated."""
    d: dict[str, Any] = dict(config.router.settings)
    d.update(host=_bind(config, target), grpc_port=config.router.grpc_port,
             http_port=config.router.http_port)
    tiers: dict[str, Any] = {}
    for t in config.tiers:
        entry: dict[str, Any] = {"replicas": replica_addresses(config, t, target)}
        if t.slo:
            entry["slo"] = dict(t.slo)
        if t.fallback is not None:
            entry["fallback"] = list(t.fallback)
        tiers[t.name] = entry
    d["tiers"] = tiers
    tenants: dict[str, Any] = {}
    for name, spec in config.tenants.items():
        entry = {k: v for k, v in spec.items() if k != "api_keys"}
        if target == LOCAL:
            entry["api_keys"] = list(spec.get("api_keys") or [])
        elif placeholder_keys:
            entry["api_keys"] = [f"placeholder-{name}-key"]
        tenants[name] = entry
    d["tenants"] = tenants
    if config.cache.enabled:
        d["cache"] = {"target": cache_target(config, target),
                      "timeout_ms": config.cache.timeout_ms,
                      "model_version": config.cache.model_version}
    tracing = _tracing(config)
    if tracing is not None:
        d["tracing"] = tracing
    return d


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def cache_env(config: ClusterConfig, target: str) -> dict[str, str]:
    """SWITCHYARD_CACHE_* variables (one per CacheConfig field) for the cache service."""
    c = config.cache
    values: dict[str, Any] = {
        "redis_url": redis_url(config, target), "host": _bind(config, target), "port": c.port,
        "metrics_port": c.metrics_port or 0, **c.settings}
    t = config.tracing
    if t.exporter != "none":
        values.update(trace_exporter=t.exporter, trace_sample_ratio=t.sample_ratio)
        if t.otlp_endpoint:
            values["otlp_endpoint"] = t.otlp_endpoint
    return {CACHE_ENV_PREFIX + k.upper(): _env_value(v) for k, v in values.items()}


def api_keys_env(config: ClusterConfig) -> dict[str, str]:
    """SWITCHYARD_API_KEYS_<TENANT> for every tenant that lists keys."""
    return {api_keys_var(name): ",".join(spec["api_keys"])
            for name, spec in config.tenants.items() if spec.get("api_keys")}


def dump_yaml(data: dict[str, Any], header: str = "") -> str:
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def dump_env(values: dict[str, str], header: str = "") -> str:
    return header + "".join(f"{k}={v}\n" for k, v in sorted(values.items()))


def render_k8s(config: ClusterConfig, source: str) -> dict[str, str]:
    """File name -> text of everything the Kubernetes ConfigMap and Secret are built from."""
    header = (f"# Rendered from {source}\n"
              "# by `switchyard render-config --target k8s`; do not edit by hand.\n")
    files = {"router.yaml": dump_yaml(router_settings(config, K8S), header)}
    for t in config.tiers:
        files[f"{worker_service(t.name)}.yaml"] = dump_yaml(worker_settings(config, t, K8S),
                                                            header)
    if config.cache.enabled:
        files["cache.env"] = dump_env(cache_env(config, K8S), header)
    keys = api_keys_env(config)
    if keys:
        files["api-keys.env"] = dump_env(keys, header + "# Development keys only.\n")
    return files


def write_files(files: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written
