"""Router configuration: frozen dataclasses built from one YAML file, validated on construction.

Nothing here reads files or the environment at import time: `load_config(path)` reads the
YAML (called by __main__), `RouterConfig.from_dict` builds and validates. Errors name the
offending key path, e.g. "tenants.acme.max_concurrent: must be >= 1, got 0".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.common.grpc_options import MIN_PING_INTERVAL_MS
from services.common.telemetry import TracingConfig
from services.router.classifier.model import Thresholds
from services.router.config_sections import (  # noqa: F401 (re-exported)
    BalancerConfig,
    CacheClientConfig,
    CascadeConfig,
    ClassifierConfig,
    ConfigError,
    HealthConfig,
    TlsSection,
    _check_keys,
    _positive,
    _tier,
)
from services.router.domain import Tier


@dataclass(frozen=True)
class SloTargets:
    """Latency targets of a tier; a request meeting both counts toward goodput."""

    ttft_ms: float = 1000.0
    """Time to first token, from the router's arrival."""
    tpot_ms: float = 200.0
    """Mean time per output token after the first."""

    def validate(self, path: str) -> None:
        _positive(f"{path}.ttft_ms", self.ttft_ms)
        _positive(f"{path}.tpot_ms", self.tpot_ms)


@dataclass(frozen=True)
class TierConfig:
    """One tier: its worker replicas (host:port), SLO targets and fallback order."""

    tier: Tier
    replicas: tuple[str, ...]
    slo: SloTargets = field(default_factory=SloTargets)
    fallback: tuple[Tier, ...] | None = None
    """Tiers tried, in order, when this one has no healthy replica. None = the other
    configured tiers, larger ones first (then smaller, nearest first)."""

    @classmethod
    def from_dict(cls, name: str, data: Any) -> TierConfig:
        path = f"tiers.{name}"
        d = _check_keys(data, cls, path)
        d.pop("tier", None)
        tier = _tier(path, name)
        replicas = d.pop("replicas", None)
        if not replicas or not isinstance(replicas, list) or not all(
                isinstance(r, str) and ":" in r for r in replicas):
            raise ConfigError(f"{path}.replicas: expected a non-empty list of host:port, "
                              f"got {replicas!r}")
        if len(set(replicas)) != len(replicas):
            raise ConfigError(f"{path}.replicas: duplicate address in {replicas}")
        slo = SloTargets(**_check_keys(d.pop("slo", None), SloTargets, f"{path}.slo"))
        slo.validate(f"{path}.slo")
        fb = d.pop("fallback", None)
        fallback = None if fb is None else tuple(
            _tier(f"{path}.fallback[{i}]", t) for i, t in enumerate(fb))
        return cls(tier=tier, replicas=tuple(replicas), slo=slo, fallback=fallback)


@dataclass(frozen=True)
class TenantConfig:
    """A tenant: its API keys and what it may do."""

    name: str
    api_keys: tuple[str, ...]
    permission_scope: str = ""
    """The tenant's permission scope (part of the response-cache scope)."""
    max_concurrent: int | None = None
    """Requests in flight at once; None = unlimited."""
    tokens_per_minute: int | None = None
    """Prompt + completion tokens per minute (token bucket); None = unlimited."""
    allowed_tiers: frozenset[Tier] = frozenset(Tier)
    allow_tier_hint: bool = True
    """Whether the client's tier hint (or OpenAI `model` tier name) may override the
    classifier. False: hints are ignored (the classifier decides), never an error."""
    thresholds: Thresholds | None = None
    """Classifier score cut points for this tenant; None = the trained defaults."""
    cascade: bool = False
    """Use the cascade policy for this tenant's non-streaming, unhinted requests."""
    cache: bool = True
    """Whether this tenant's requests use the response cache at all."""

    @classmethod
    def from_dict(cls, name: str, data: Any) -> TenantConfig:
        path = f"tenants.{name}"
        d = _check_keys(data, cls, path)
        d.pop("name", None)
        keys = d.pop("api_keys", None)
        if not keys or not all(isinstance(k, str) and len(k) >= 8 for k in keys):
            raise ConfigError(f"{path}.api_keys: expected a non-empty list of strings of at "
                              f"least 8 characters")
        for key in ("max_concurrent", "tokens_per_minute"):
            value = d.get(key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{path}.{key}: must be an integer >= 1 or null, got {value!r}")
        if "allowed_tiers" in d:
            d["allowed_tiers"] = frozenset(_tier(f"{path}.allowed_tiers[{i}]", t)
                                           for i, t in enumerate(d["allowed_tiers"] or []))
            if not d["allowed_tiers"]:
                raise ConfigError(f"{path}.allowed_tiers: must name at least one tier")
        if d.get("thresholds") is not None:
            t = d["thresholds"]
            try:
                d["thresholds"] = Thresholds(**_check_keys(t, Thresholds, f"{path}.thresholds"))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path}.thresholds: {exc}") from None
        return cls(name=name, api_keys=tuple(keys), **d)


@dataclass(frozen=True)
class RouterConfig:
    """The whole router."""

    tiers: tuple[TierConfig, ...]
    tenants: tuple[TenantConfig, ...]
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    """0 picks a free port."""
    http_port: int = 8080
    """OpenAI-compatible API and /metrics; 0 picks a free port."""
    cache: CacheClientConfig | None = None
    """None = no response cache."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    max_attempts: int = 3
    """Dispatch attempts per request (replica retries and tier fallbacks together)."""
    max_in_flight: int = 1024
    """Requests the router holds at once (all tenants); past it new ones are refused at
    once with RESOURCE_EXHAUSTED / HTTP 429, which bounds the router's memory under overload.
    Size it above the tiers' total capacity (replicas x (max_num_seqs + max_waiting))."""
    request_timeout_s: float = 300.0
    """Deadline of requests that bring none; also caps the ones that do."""
    trust_tenant_field: bool = False
    """Accept GenerateRequest.tenant from callers without credentials (internal callers)."""
    max_prompt_chars: int = 200_000
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest HTTP request body; a larger one gets 413 before it is parsed. Keep it above
    max_prompt_chars: JSON escapes take up to 6 bytes per character (12 for astral ones)."""
    tracing: TracingConfig = field(default_factory=lambda: TracingConfig(service_name="router"))
    """OpenTelemetry span export: exporter (none/console/file/otlp), otlp_endpoint, file_path,
    sample_ratio."""
    tls: TlsSection = field(default_factory=TlsSection)
    """TLS / mTLS of the gRPC port and of the worker and cache channels; off by default."""

    def __post_init__(self) -> None:
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name}: must be in [0, 65535], got {getattr(self, name)}")
        if not self.tiers:
            raise ConfigError("tiers: at least one tier is required")
        if not self.tenants:
            raise ConfigError("tenants: at least one tenant is required")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts: must be >= 1, got {self.max_attempts}")
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight: must be an integer >= 1, got {self.max_in_flight!r}")
        _positive("request_timeout_s", self.request_timeout_s)
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) \
                or self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes: must be an integer >= 1, got "
                              f"{self.max_body_bytes!r}")
        seen: dict[str, str] = {}
        for t in self.tenants:
            for key in t.api_keys:
                if key in seen:
                    raise ConfigError(f"tenants.{t.name}.api_keys: a key is also used by "
                                      f"tenant {seen[key]!r}")
                seen[key] = t.name
        configured = {t.tier for t in self.tiers}
        for t in self.tiers:
            for fb in t.fallback or ():
                if fb not in configured:
                    raise ConfigError(f"tiers.{t.tier.label}.fallback: tier {fb.label!r} is "
                                      "not configured")
        cascading = any(t.cascade for t in self.tenants)
        for name in ("from_tier", "to_tier"):
            tier = _tier(f"cascade.{name}", getattr(self.cascade, name))
            if cascading and tier not in configured:
                raise ConfigError(f"cascade.{name}: tier {tier.label!r} is not configured")
        if self.classifier.enabled is False and _tier(
                "classifier.default_tier", self.classifier.default_tier) not in configured:
            raise ConfigError(f"classifier.default_tier: tier {self.classifier.default_tier!r} "
                              "is not configured")
        b = self.balancer
        _positive("balancer.load_interval_ms", b.load_interval_ms)
        for name in ("waiting_weight", "kv_weight", "affinity_slack"):
            _positive(f"balancer.{name}", getattr(b, name), allow_zero=True)
        h = self.health
        for name in ("probe_interval_s", "max_probe_interval_s", "probe_timeout_s",
                     "load_stale_after_s", "keepalive_time_s", "keepalive_timeout_s"):
            _positive(f"health.{name}", getattr(h, name))
        if h.load_stale_after_s * 1000 < 2 * b.load_interval_ms:
            raise ConfigError(f"health.load_stale_after_s: must be at least two load intervals "
                              f"({2 * b.load_interval_ms / 1000} s), got {h.load_stale_after_s}")
        if h.keepalive_time_s * 1000 < MIN_PING_INTERVAL_MS:
            raise ConfigError(f"health.keepalive_time_s: must be >= {MIN_PING_INTERVAL_MS / 1000}"
                              f" (the servers' minimum ping interval), got {h.keepalive_time_s}")
        if self.cache is not None:
            _positive("cache.timeout_ms", self.cache.timeout_ms)
        if self.tls.health_port and self.tls.health_port == self.grpc_port:
            raise ConfigError(f"tls.health_port: must differ from grpc_port, both are "
                              f"{self.grpc_port}")

    def tier(self, tier: Tier) -> TierConfig | None:
        return next((t for t in self.tiers if t.tier == tier), None)

    def fallback_order(self, tier: Tier) -> tuple[Tier, ...]:
        """`tier` then its fallbacks (configured tiers only)."""
        cfg = self.tier(tier)
        if cfg is not None and cfg.fallback is not None:
            rest = cfg.fallback
        else:
            configured = sorted(t.tier for t in self.tiers)
            larger = [t for t in configured if t > tier]
            smaller = [t for t in reversed(configured) if t < tier]
            rest = tuple(larger + smaller)
        return (tier, *[t for t in rest if t != tier])

    @classmethod
    def from_dict(cls, data: Any) -> RouterConfig:
        d = _check_keys(data, cls, "")
        tiers = d.pop("tiers", None)
        tenants = d.pop("tenants", None)
        if not isinstance(tiers, Mapping) or not tiers:
            raise ConfigError("tiers: expected a mapping of tier name -> {replicas: [...]}")
        if not isinstance(tenants, Mapping) or not tenants:
            raise ConfigError("tenants: expected a mapping of tenant name -> {api_keys: [...]}")
        sections = {"cache": CacheClientConfig, "classifier": ClassifierConfig,
                    "balancer": BalancerConfig, "health": HealthConfig,
                    "cascade": CascadeConfig}
        if "tls" in d:
            d["tls"] = TlsSection.from_dict(d["tls"])
        if "tracing" in d:
            try:
                d["tracing"] = TracingConfig(**{"service_name": "router", **_check_keys(
                    d["tracing"], TracingConfig, "tracing")})
            except ValueError as exc:
                raise ConfigError(f"tracing: {exc}") from None
        for key, section in sections.items():
            if key in d:
                if d[key] is None and key == "cache":
                    continue
                try:
                    d[key] = section(**_check_keys(d[key], section, key))
                except TypeError as exc:
                    raise ConfigError(f"{key}: {exc}") from None
        return cls(tiers=tuple(TierConfig.from_dict(str(n), v) for n, v in tiers.items()),
                   tenants=tuple(TenantConfig.from_dict(str(n), v) for n, v in tenants.items()),
                   **d)


def load_config(path: str | Path) -> RouterConfig:
    """Reads and validates a YAML config file."""
    with open(path) as f:
        data = yaml.safe_load(f)
    try:
        return RouterConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
