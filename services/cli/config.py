"""The cluster configuration: one YAML file for `switchyard up` and for the Kubernetes ConfigMap.

`ClusterConfig.from_dict` checks the file's own structure (unknown keys, types, ranges);
`check_local_ports` the port clashes of a one-machine run; `check_service_configs` builds each
service's own config (WorkerConfig, CacheConfig, RouterConfig) from the rendered settings, so a
value a service would refuse is refused here, with the cluster key path in front. Nothing here
reads files or the environment except `load_config(path)`.

Layout (services/cli/default.yaml is the reference):

    host: 127.0.0.1                 # where `switchyard up` binds (Kubernetes binds 0.0.0.0)
    redis:   {url: null, port: 6390}
    cache:   {enabled: true, port: 50070, metrics_port: 9470, timeout_ms: 50, settings: {...}}
    router:  {grpc_port: 50051, http_port: 8080, settings: {...}}
    worker_defaults: {threads: 1, ...}          # WorkerConfig fields for every tier
    tiers:
      small: {model: smollm2, quantization: int4, replicas: 1, port: 50061, ...}
    tenants: {demo: {api_keys: [...], ...}}     # the router's tenant entries
    tracing: {exporter: none, otlp_endpoint: null, sample_ratio: 1.0}
    supervisor: {ready_timeout_s: 900, ...}     # `switchyard up` only
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TIER_NAMES = ("small", "quantized", "large")
QUANTIZATIONS = ("none", "int8", "int4")
# Keys a tier sets itself (the rest of a tier's entry are WorkerConfig fields).
_TIER_OWN_KEYS = ("model", "quantization", "replicas", "port", "metrics_port", "slo", "fallback")
# WorkerConfig fields the renderer owns: addresses, identity and tracing come from the cluster.
_WORKER_RENDERED = ("model", "tier", "worker_id", "host", "port", "metrics_port", "tracing",
                    "quantization")
# CacheConfig fields the renderer owns.
_CACHE_RENDERED = ("redis_url", "host", "port", "metrics_port", "trace_exporter",
                   "otlp_endpoint", "trace_file", "trace_sample_ratio")
# RouterConfig keys the renderer owns.
_ROUTER_RENDERED = ("tiers", "tenants", "cache", "host", "grpc_port", "http_port", "tracing")
# Service settings the cluster config refuses for now: TLS needs certificates per service and
# health ports, and `switchyard up`'s readiness probes and CLI clients speak plaintext. The
# services take them from their own configs (services/common/tls.py).
_TLS_KEYS = ("tls", "health_port", "tls_cert_file", "tls_key_file", "tls_ca_file",
             "tls_require_client_cert")


class ConfigError(ValueError):
    """A bad cluster configuration value; the message starts with its key path."""


def _mapping(data: Any, path: str, known: tuple[str, ...] | None = None) -> dict:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    if known is not None:
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{path or 'config'}: unknown key(s) {unknown}; "
                              f"known: {sorted(known)}")
    return dict(data)


def _port(path: str, value: Any, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{path}: expected a port in [1, 65535], got {value!r}")
    return value


def _number(path: str, value: Any, *, minimum: float = 0.0, strict: bool = True) -> float:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > minimum if strict else value >= minimum))
    if not ok:
        raise ConfigError(f"{path}: expected a number {'>' if strict else '>='} {minimum}, "
                          f"got {value!r}")
    return float(value)


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class RedisSpec:
    """Where the cache keeps its entries."""

    url: str | None = None
    """An external Redis (redis://host:port/db). None: `switchyard up` starts a local
    redis-server and Kubernetes uses the redis StatefulSet."""
    port: int = 6390
    """Port of the local redis-server (`switchyard up` only)."""


@dataclass(frozen=True)
class CacheSpec:
    """The response cache service, and how the router uses it."""

    enabled: bool = True
    port: int = 50070
    metrics_port: int | None = 9470
    """Prometheus endpoint; None: off."""
    timeout_ms: float = 50.0
    """The router's budget for one Lookup or Store."""
    model_version: str = "v1"
    """Part of every cache scope: bump it when tier models change so old answers retire."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Other CacheConfig fields (services/cache/config.py)."""


@dataclass(frozen=True)
class RouterSpec:
    """The public entry point."""

    grpc_port: int = 50051
    http_port: int = 8080
    """OpenAI-compatible API and /metrics."""
    drain_timeout_s: float = 10.0
    """On SIGTERM: how long in-flight requests may finish."""
    discovery_interval_s: float = 10.0
    """How often worker addresses are resolved again (Kubernetes headless Services)."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """Other RouterConfig keys (services/router/config.py): balancer, health, classifier,
    cascade, max_attempts, request_timeout_s, ..."""


@dataclass(frozen=True)
class TierSpec:
    """One worker tier: its model, replicas and SLO."""

    name: str
    model: str
    """A .gguf file, an HF checkpoint folder, or "smollm2"."""
    port: int
    """gRPC port. Locally replica i listens on port + i; on Kubernetes every pod uses port."""
    quantization: str = "none"
    """Weight quantization of the worker: none, int8 or int4."""
    replicas: int = 1
    metrics_port: int | None = None
    """Prometheus endpoint (locally metrics_port + i); None: off."""
    slo: Mapping[str, float] = field(default_factory=dict)
    """ttft_ms / tpot_ms targets (the router's SloTargets)."""
    fallback: tuple[str, ...] | None = None
    worker: Mapping[str, Any] = field(default_factory=dict)
    """WorkerConfig fields (worker_defaults merged with the tier's own)."""

    def local_ports(self) -> list[int]:
        return [self.port + i for i in range(self.replicas)]

    def local_metrics_ports(self) -> list[int | None]:
        return [None if self.metrics_port is None else self.metrics_port + i
                for i in range(self.replicas)]


@dataclass(frozen=True)
class SupervisorSpec:
    """How `switchyard up` runs its processes."""

    ready_timeout_s: float = 900.0
    """How long a process may take to turn ready (model loads included)."""
    stop_timeout_s: float = 45.0
    """SIGTERM, then SIGKILL after this long; longer than any drain timeout."""
    restart_backoff_s: float = 1.0
    """First delay before restarting a crashed process; doubles per crash."""
    max_restart_backoff_s: float = 30.0
    stable_after_s: float = 60.0
    """A process up this long has its backoff reset."""


@dataclass(frozen=True)
class TracingSpec:
    """Span export of every service (services/common/telemetry.py)."""

    exporter: str = "none"
    otlp_endpoint: str | None = None
    sample_ratio: float = 1.0


@dataclass(frozen=True)
class ClusterConfig:
    """The whole cluster; see the module docstring for the YAML layout."""

    tiers: tuple[TierSpec, ...]
    tenants: Mapping[str, Mapping[str, Any]]
    host: str = "127.0.0.1"
    redis: RedisSpec = field(default_factory=RedisSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    router: RouterSpec = field(default_factory=RouterSpec)
    tracing: TracingSpec = field(default_factory=TracingSpec)
    supervisor: SupervisorSpec = field(default_factory=SupervisorSpec)

    def tier(self, name: str) -> TierSpec:
        return next(t for t in self.tiers if t.name == name)

    @classmethod
    def from_dict(cls, data: Any) -> ClusterConfig:
        d = _mapping(data, "", _fields(cls) + ("worker_defaults",))
        defaults = _mapping(d.pop("worker_defaults", None), "worker_defaults")
        tiers = _mapping(d.pop("tiers", None), "tiers")
        if not tiers:
            raise ConfigError(f"tiers: at least one of {list(TIER_NAMES)} is required")
        tenants = _mapping(d.pop("tenants", None), "tenants")
        if not tenants:
            raise ConfigError("tenants: at least one tenant is required")
        config = cls(
            tiers=tuple(_tier(str(name), spec, defaults) for name, spec in tiers.items()),
            tenants={str(k): _mapping(v, f"tenants.{k}") for k, v in tenants.items()},
            host=str(d.pop("host", "127.0.0.1")),
            redis=_section(RedisSpec, d.pop("redis", None), "redis"),
            cache=_section(CacheSpec, d.pop("cache", None), "cache"),
            router=_section(RouterSpec, d.pop("router", None), "router"),
            tracing=_section(TracingSpec, d.pop("tracing", None), "tracing"),
            supervisor=_section(SupervisorSpec, d.pop("supervisor", None), "supervisor"))
        config._check()
        return config

    def _check(self) -> None:
        r, c, s = self.redis, self.cache, self.supervisor
        _port("redis.port", r.port)
        if r.url is not None and not str(r.url).startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"redis.url: expected a redis:// URL or null, got {r.url!r}")
        _port("cache.port", c.port)
        _port("cache.metrics_port", c.metrics_port, optional=True)
        _number("cache.timeout_ms", c.timeout_ms)
        _port("router.grpc_port", self.router.grpc_port)
        _port("router.http_port", self.router.http_port)
        _number("router.drain_timeout_s", self.router.drain_timeout_s, strict=False)
        _number("router.discovery_interval_s", self.router.discovery_interval_s)
        for name in ("ready_timeout_s", "stop_timeout_s", "restart_backoff_s",
                     "max_restart_backoff_s", "stable_after_s"):
            _number(f"supervisor.{name}", getattr(s, name))
        for key, rendered in (("cache.settings", _CACHE_RENDERED),
                              ("router.settings", _ROUTER_RENDERED)):
            section = c.settings if key == "cache.settings" else self.router.settings
            owned = sorted(set(_mapping(section, key)) & set(rendered))
            if owned:
                raise ConfigError(f"{key}: {owned} are set from the cluster config itself "
                                  "(ports, addresses, tiers, tenants, tracing); move them there")
            tls = sorted(set(_mapping(section, key)) & set(_TLS_KEYS))
            if tls:
                raise ConfigError(f"{key}: {tls}: TLS is not part of the cluster config yet")
        if len({t.name for t in self.tiers}) != len(self.tiers):
            raise ConfigError("tiers: a tier is listed twice")
        for t in self.tiers:
            for fb in t.fallback or ():
                if fb not in {x.name for x in self.tiers}:
                    raise ConfigError(f"tiers.{t.name}.fallback: tier {fb!r} is not configured")

    def check_local_ports(self) -> None:
        """`switchyard up` runs everything on one host: no two listeners may share a port."""
        used: dict[int, str] = {}

        def claim(port: int | None, what: str) -> None:
            if port is None:
                return
            if port in used:
                raise ConfigError(f"{what}: port {port} is also used by {used[port]}")
            if not 1 <= port <= 65535:
                raise ConfigError(f"{what}: port {port} is out of range")
            used[port] = what

        if self.redis.url is None:
            claim(self.redis.port, "redis.port")
        if self.cache.enabled:
            claim(self.cache.port, "cache.port")
            claim(self.cache.metrics_port, "cache.metrics_port")
        claim(self.router.grpc_port, "router.grpc_port")
        claim(self.router.http_port, "router.http_port")
        for t in self.tiers:
            ports = zip(t.local_ports(), t.local_metrics_ports(), strict=True)
            for i, (p, m) in enumerate(ports):
                claim(p, f"tiers.{t.name}.port (replica {i})")
                claim(m, f"tiers.{t.name}.metrics_port (replica {i})")


def _section(cls: type, data: Any, path: str) -> Any:
    d = _mapping(data, path, _fields(cls))
    for f in dataclasses.fields(cls):
        if f.name in d and f.name != "settings" and isinstance(d[f.name], (dict, list)):
            raise ConfigError(f"{path}.{f.name}: expected a single value, got {d[f.name]!r}")
    return cls(**d)


def _tier(name: str, data: Any, defaults: Mapping[str, Any]) -> TierSpec:
    from services.worker.config import WorkerConfig  # no torch: cheap

    path = f"tiers.{name}"
    if name not in TIER_NAMES:
        raise ConfigError(f"{path}: unknown tier; expected one of {list(TIER_NAMES)}")
    worker_fields = tuple(f for f in _fields(WorkerConfig)
                          if f not in _WORKER_RENDERED + _TLS_KEYS)
    d = _mapping(data, path, _TIER_OWN_KEYS + worker_fields)
    bad = sorted(set(defaults) - set(worker_fields))
    if bad:
        raise ConfigError(f"worker_defaults: unknown key(s) {bad}; known: {sorted(worker_fields)}")
    model = d.pop("model", None)
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{path}.model: expected a model path or 'smollm2', got {model!r}")
    quant = d.pop("quantization", "none")
    if quant not in QUANTIZATIONS:
        raise ConfigError(f"{path}.quantization: expected one of {list(QUANTIZATIONS)}, "
                          f"got {quant!r}")
    replicas = d.pop("replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ConfigError(f"{path}.replicas: expected an integer >= 1, got {replicas!r}")
    port = _port(f"{path}.port", d.pop("port", None))
    metrics_port = _port(f"{path}.metrics_port", d.pop("metrics_port", None), optional=True)
    slo = _mapping(d.pop("slo", None), f"{path}.slo", ("ttft_ms", "tpot_ms"))
    for key, value in slo.items():
        _number(f"{path}.slo.{key}", value)
    fallback = d.pop("fallback", None)
    if fallback is not None and (not isinstance(fallback, list)
                                 or not all(isinstance(x, str) for x in fallback)):
        raise ConfigError(f"{path}.fallback: expected a list of tier names, got {fallback!r}")
    worker = {**defaults, **d}
    kwargs = _worker_kwargs(worker)
    if "quantization" in _fields(WorkerConfig):  # the worker checks the scheme name too
        kwargs["quantization"] = quant
    try:  # the worker's own validation, before any process starts
        WorkerConfig(model=model, tier=name, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return TierSpec(name=name, model=model, port=port, quantization=quant, replicas=replicas,
                    metrics_port=metrics_port, slo=slo,
                    fallback=None if fallback is None else tuple(fallback), worker=worker)


def _worker_kwargs(worker: Mapping[str, Any]) -> dict[str, Any]:
    """WorkerConfig keyword arguments from YAML values (the KV `cache` section nested)."""
    from services.worker.engine.config import CacheConfig as KVCacheConfig

    kwargs = dict(worker)
    if "cache" in kwargs:
        kwargs["cache"] = KVCacheConfig(**_mapping(kwargs["cache"], "cache"))
    return kwargs


def load_config(path: str | Path, target: str = "local", *,
                check_services: bool = True) -> ClusterConfig:
    """Reads and validates a cluster YAML file, then (`check_services`) checks it against
    every service's schema as rendered for `target` ("local" or "k8s")."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        config = ClusterConfig.from_dict(data)
        if target == "local":
            config.check_local_ports()
        if check_services:
            check_service_configs(config, target)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config


def check_service_configs(config: ClusterConfig, target: str = "local") -> None:
    """Builds the cache's and the router's own configs from what would be rendered for
    `target`, so their validation runs now (imports the router's config module: torch)."""
    from services.cache.__main__ import parse_args as cache_args
    from services.cli import render
    from services.router.config import ConfigError as RouterConfigError
    from services.router.config import RouterConfig

    if config.cache.enabled:
        # The cache reads these variables in production (ConfigMap -> env), so check them
        # through its own parser; argparse reports on stderr and exits, so catch both.
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                cache_args([], render.cache_env(config, target))
        except SystemExit:
            message = err.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
            raise ConfigError(f"cache.settings: {message}") from None
    if target == render.LOCAL:
        missing = [n for n, spec in config.tenants.items() if not spec.get("api_keys")]
        if missing:
            raise ConfigError(f"tenants.{missing[0]}.api_keys: `switchyard up` needs the keys "
                              "in the file (only Kubernetes takes them from a Secret)")
    try:
        RouterConfig.from_dict(render.router_settings(config, target, placeholder_keys=True))
    except RouterConfigError as exc:
        raise ConfigError(f"router (built from tiers, tenants and router.settings): "
                          f"{exc}") from None
