"""The cluster config of `switchyard up` and the ConfigMap: validation names the bad key, and
rendering gives each service what it expects (local and Kubernetes targets)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from services.cli import render
from services.cli.config import ClusterConfig, ConfigError, check_service_configs, load_config
from services.cli.router_main import load_router_data

DEFAULT = Path(__file__).resolve().parents[2] / "services" / "cli" / "default.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(DEFAULT.read_text())


def build(raw: dict, edit) -> ClusterConfig:
    data = copy.deepcopy(raw)
    edit(data)
    config = ClusterConfig.from_dict(data)
    config.check_local_ports()
    check_service_configs(config)
    return config


def test_default_config_is_the_2_core_smollm2_cluster():
    config = load_config(DEFAULT)
    assert [(t.name, t.model, t.quantization, t.replicas) for t in config.tiers] == [
        ("small", "smollm2", "int4", 1), ("quantized", "smollm2", "int8", 1),
        ("large", "smollm2", "none", 1)]
    assert all(t.worker["threads"] == 1 for t in config.tiers)
    assert config.redis.url is None  # `up` starts redis-server itself


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(colour="blue"), "config: unknown key(s) ['colour']"),
    (lambda d: d["tiers"]["small"].update(quantisation="int8"),
     "tiers.small: unknown key(s) ['quantisation']"),
    (lambda d: d["tiers"]["small"].update(quantization="fp8"), "tiers.small.quantization"),
    (lambda d: d["tiers"].update(huge=d["tiers"]["large"]), "tiers.huge: unknown tier"),
    (lambda d: d["tiers"]["large"].update(replicas=0), "tiers.large.replicas"),
    (lambda d: d["tiers"]["large"].update(port=70000), "tiers.large.port"),
    (lambda d: d["tiers"]["small"].update(threads=0), "tiers.small: threads must be >= 1"),
    (lambda d: d["worker_defaults"].update(dtype="fp64"), "tiers.small: dtype must be one of"),
    (lambda d: d["tiers"]["small"].update(fallback=["medium"]),
     "tiers.small.fallback: tier 'medium' is not configured"),
    (lambda d: d["tiers"]["small"].update(replicas=2),
     "tiers.quantized.port (replica 0): port 50062 is also used by tiers.small.port (replica 1)"),
    (lambda d: d["router"].update(http_port=6390), "router.http_port: port 6390 is also used"),
    (lambda d: d["cache"]["settings"].update(ttl_s=-1), "cache.settings: ttl_s must be"),
    (lambda d: d["cache"]["settings"].update(port=1), "cache.settings: ['port'] are set from"),
    (lambda d: d["router"]["settings"].update(max_attempts=0),
     "router (built from tiers, tenants and router.settings): max_attempts: must be >= 1"),
    (lambda d: d["tenants"]["demo"].update(api_keys=["short"]), "tenants.demo.api_keys"),
    (lambda d: d["tenants"]["demo"].pop("api_keys"), "tenants.demo.api_keys: `switchyard up`"),
    (lambda d: d["tracing"].update(exporter="otlp"), "otlp_endpoint"),
    (lambda d: d["supervisor"].update(stop_timeout_s=0), "supervisor.stop_timeout_s"),
])
def test_bad_values_are_refused_with_their_key_path(raw, edit, message):
    with pytest.raises((ConfigError, ValueError)) as err:
        build(raw, edit)
    assert message in str(err.value)


def test_load_config_names_the_file(tmp_path, raw):
    bad = copy.deepcopy(raw)
    bad["redis"]["url"] = "http://nope"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"c\.yaml: redis\.url: expected a redis:// URL"):
        load_config(path)


def test_local_render_addresses_each_replica(raw):
    def two_small(d):
        d["tiers"]["small"]["replicas"] = 2
        d["tiers"]["quantized"]["port"] = 50072
        d["tiers"]["quantized"]["metrics_port"] = 9472
    config = build(raw, two_small)
    router = render.router_settings(config, render.LOCAL)
    assert router["tiers"]["small"]["replicas"] == ["127.0.0.1:50061", "127.0.0.1:50062"]
    assert router["tenants"]["demo"]["api_keys"] == ["sk-demo-0123456789"]
    assert router["cache"]["target"] == "127.0.0.1:50070"
    worker = render.worker_settings(config, config.tier("small"), render.LOCAL)
    assert (worker["tier"], worker["quantization"], worker["threads"]) == ("small", "int4", 1)
    env = render.cache_env(config, render.LOCAL)
    assert env["SWITCHYARD_CACHE_REDIS_URL"] == "redis://127.0.0.1:6390/0"


def test_k8s_render_keeps_keys_out_of_the_configmap(raw):
    config = build(raw, lambda d: None)
    files = render.render_k8s(config, "default.yaml")
    assert "sk-demo" not in files["router.yaml"]
    assert "SWITCHYARD_API_KEYS_DEMO=sk-demo-0123456789" in files["api-keys.env"]
    router = yaml.safe_load(files["router.yaml"])
    assert router["host"] == "0.0.0.0"
    assert router["tiers"]["large"]["replicas"] == ["worker-large:50063"]  # headless Service
    assert router["cache"]["target"] == "cache:50070"
    assert "SWITCHYARD_CACHE_REDIS_URL=redis://redis:6379/0" in files["cache.env"]


def test_router_launcher_takes_keys_from_the_environment(tmp_path, raw):
    config = build(raw, lambda d: None)
    path = tmp_path / "router.yaml"
    path.write_text(render.render_k8s(config, "x")["router.yaml"])
    with pytest.raises(ValueError, match="SWITCHYARD_API_KEYS_DEMO is not set"):
        load_router_data(path, {})
    data = load_router_data(path, {"SWITCHYARD_API_KEYS_DEMO": "sk-aaaaaaaaaa, sk-bbbbbbbbbb"})
    assert data["tenants"]["demo"]["api_keys"] == ["sk-aaaaaaaaaa", "sk-bbbbbbbbbb"]
