"""Router pieces without servers: config validation, auth, limits, SLO, the balancer."""

from __future__ import annotations

import random

import pytest

from services.router.auth import Authenticator, key_from_headers
from services.router.balancer import Balancer
from services.router.config import BalancerConfig, ConfigError, RouterConfig
from services.router.domain import Tier
from services.router.errors import PermissionDenied, RateLimited, Unauthenticated
from services.router.limits import Limits
from services.router.replicas import LoadSnapshot
from services.router.slo import Latency, meets

BASE = {"tiers": {"small": {"replicas": ["127.0.0.1:1"]}, "large": {"replicas": ["127.0.0.1:2"]}},
        "tenants": {"a": {"api_keys": ["sk-aaaaaaaa"], "max_concurrent": 2,
                          "tokens_per_minute": 120}}}


def _config(**changes) -> RouterConfig:
    data = {**BASE, **changes}
    return RouterConfig.from_dict(data)


@pytest.mark.parametrize("data, message", [
    ({"tiers": {"huge": {"replicas": ["h:1"]}}}, "tiers.huge: unknown tier 'huge'"),
    ({"tiers": {"small": {"replicas": []}}}, "tiers.small.replicas: expected a non-empty list"),
    ({"tiers": {"small": {"replicas": ["h:1"], "slo": {"ttft_ms": 0}}}},
     "tiers.small.slo.ttft_ms: must be a number > 0, got 0"),
    ({"tiers": {"small": {"replicas": ["h:1"], "fallback": ["large"]}}},
     "tiers.small.fallback: tier 'large' is not configured"),
    ({"tenants": {"a": {"api_keys": ["sk-aaaaaaaa"], "max_concurrent": 0}}},
     "tenants.a.max_concurrent: must be an integer >= 1 or null, got 0"),
    ({"tenants": {"a": {"api_keys": ["short"]}}}, "tenants.a.api_keys"),
    ({"tenants": {"a": {"api_keys": ["sk-aaaaaaaa"]}, "b": {"api_keys": ["sk-aaaaaaaa"]}}},
     "tenants.b.api_keys: a key is also used by tenant 'a'"),
    ({"tenants": {"a": {"api_keys": ["sk-aaaaaaaa"],
                        "thresholds": {"quantized_at": 0.8, "large_at": 0.2}}}},
     "tenants.a.thresholds: thresholds must satisfy"),
    ({"tenants": {"a": {"api_keys": ["sk-aaaaaaaa"], "colour": "red"}}},
     "tenants.a: unknown key(s) ['colour']"),
    ({"balancer": {"affinity_slack": -1}}, "balancer.affinity_slack: must be a number >= 0"),
    ({"grpc_port": 70000}, "grpc_port: must be in [0, 65535], got 70000"),
    ({"max_in_flight": 0}, "max_in_flight: must be an integer >= 1, got 0"),
    ({"health": {"load_stale_after_s": 0.1}},
     "health.load_stale_after_s: must be at least two load intervals (0.2 s), got 0.1"),
    ({"health": {"keepalive_time_s": 0.5}}, "health.keepalive_time_s: must be >= 1.0"),
    ({"health": {"keepalive_timeout_s": -1}}, "health.keepalive_timeout_s: must be a number > 0"),
])
def test_config_errors_name_the_bad_value(data, message):
    with pytest.raises(ConfigError) as info:
        _config(**data)
    assert message in str(info.value)


def test_fallback_order_prefers_larger_then_nearest_smaller():
    cfg = RouterConfig.from_dict({**BASE, "tiers": {
        "small": {"replicas": ["h:1"]}, "quantized": {"replicas": ["h:2"]},
        "large": {"replicas": ["h:3"], "fallback": ["small"]}}})
    assert cfg.fallback_order(Tier.SMALL) == (Tier.SMALL, Tier.QUANTIZED, Tier.LARGE)
    assert cfg.fallback_order(Tier.QUANTIZED) == (Tier.QUANTIZED, Tier.LARGE, Tier.SMALL)
    assert cfg.fallback_order(Tier.LARGE) == (Tier.LARGE, Tier.SMALL)


def test_auth_keys_and_tenant_claims():
    cfg = _config()
    auth = Authenticator(cfg.tenants)
    assert key_from_headers([("Authorization", "Bearer sk-aaaaaaaa")]) == "sk-aaaaaaaa"
    assert key_from_headers([("x-api-key", "sk-aaaaaaaa")]) == "sk-aaaaaaaa"
    with pytest.raises(Unauthenticated, match="Bearer"):
        key_from_headers([("authorization", "Basic abc")])
    assert auth.authenticate("sk-aaaaaaaa").tenant.name == "a"
    for bad in (None, "", "sk-bbbbbbbb"):
        with pytest.raises(Unauthenticated):
            auth.authenticate(bad)
    with pytest.raises(PermissionDenied, match="belongs to tenant 'a'"):
        auth.resolve("sk-aaaaaaaa", "other", trust_claims=False)
    assert auth.resolve(None, "a", trust_claims=True).tenant.name == "a"
    with pytest.raises(Unauthenticated):
        auth.resolve(None, "a", trust_claims=False)


def test_limits_concurrency_and_token_bucket():
    now = [0.0]
    limits = Limits(list(_config().tenants), clock=lambda: now[0])
    t1, t2 = limits.admit("a", 50), limits.admit("a", 50)
    with pytest.raises(RateLimited) as info:
        limits.admit("a", 1)
    assert info.value.limit == "max_concurrent" and "max_concurrent=2" in info.value.message
    t1.release(used_tokens=10)  # 40 of its 50 come back: 60 left
    t2.release(used_tokens=50)
    with pytest.raises(RateLimited) as info:
        limits.admit("a", 100)
    assert info.value.limit == "tokens_per_minute"
    assert info.value.retry_after_s == pytest.approx(20.0)  # 40 missing at 2 tokens/s
    now[0] += 20.0
    limits.admit("a", 100).release(None)
    with pytest.raises(RateLimited, match="lower max_tokens"):
        limits.admit("a", 500)  # more than a whole minute's budget


def test_slo_goodput_rule():
    assert meets(Latency.measure(90, 590, 11), _config().tiers[0].slo)  # TPOT 50 ms
    slo = type(_config().tiers[0].slo)(ttft_ms=100, tpot_ms=40)
    assert not meets(Latency.measure(90, 590, 11), slo)
    assert not meets(Latency.measure(150, 150, 1), slo)
    assert meets(Latency.measure(50, 50, 1), slo)  # one token: TPOT does not apply


class _Replica:
    def __init__(self, address: str, running: int, waiting: int = 0):
        self.address = address
        self.load = LoadSnapshot(address, "m", running, waiting, 64, 100, 100, True)
        self.in_flight = 0

    def score(self) -> float:
        return self.load.num_running + 2 * self.load.num_waiting


class _Pool:
    def __init__(self, replicas):
        self.replicas = replicas

    def available(self, tier):
        return self.replicas


def test_p2c_prefers_the_less_loaded_and_affinity_yields_when_overloaded():
    busy, idle = _Replica("busy:1", running=8), _Replica("idle:1", running=0)
    bal = Balancer(_Pool([busy, idle]), BalancerConfig(affinity_slack=4.0), random.Random(0))
    assert {bal.pick(Tier.SMALL, "", set()).replica for _ in range(20)} == {idle}
    # Find a system prompt whose rendezvous winner is the busy replica: affinity must yield.
    prompt = next(p for p in (f"You are assistant number {i}." * 3 for i in range(100))
                  if Balancer(_Pool([busy, _Replica("idle:1", 0)]), BalancerConfig(
                      affinity_slack=100.0)).pick(Tier.SMALL, p, set()).replica is busy)
    choice = bal.pick(Tier.SMALL, prompt, set())
    assert choice.replica is idle and choice.reason == "affinity yielded (overloaded)"
    busy.load = LoadSnapshot("busy:1", "m", 2, 0, 64, 100, 100, True)  # within the slack
    assert bal.pick(Tier.SMALL, prompt, set()) .reason == "affinity"
    assert bal.pick(Tier.SMALL, prompt, {busy}).replica is idle


def test_example_config_parses_with_and_without_its_tls_block(tmp_path):
    """The README points at services/router/router.example.yaml; its commented `tls:` block
    must stay valid too."""
    from pathlib import Path

    from services.router.config import load_config

    example = Path(__file__).resolve().parents[2] / "services/router/router.example.yaml"
    plain = load_config(example)
    assert plain.tls.server is None and plain.max_in_flight == 1024
    text = example.read_text().replace("# tls:", "tls:").replace("\n#   ", "\n  ")
    (tmp_path / "tls.yaml").write_text(text)
    with_tls = load_config(tmp_path / "tls.yaml")
    assert with_tls.tls.server.require_client_cert and with_tls.tls.health_port == 50052
    assert with_tls.tls.workers.cert_file.endswith("router-client.crt")
