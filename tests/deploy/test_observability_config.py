"""Alert rules and the Grafana dashboard: promtool checks, and every metric they name exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.cache.metrics import CacheMetrics
from services.router.metrics import RouterMetrics
from services.worker.engine.engine import EngineStats
from services.worker.metrics import WorkerMetrics

OBS = Path(__file__).resolve().parents[2] / "deploy" / "observability"
PROMTOOL = shutil.which("promtool")
NEEDS_PROMTOOL = "promtool (Debian package 'prometheus') is installed by scripts/setup.sh"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL, NEEDS_PROMTOOL
    return subprocess.run([PROMTOOL, *args], cwd=OBS, capture_output=True, text=True, timeout=60)


def test_rules_pass_promtool_check():
    proc = _promtool("check", "rules", "prometheus-rules.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_unit_tests_pass():
    proc = _promtool("test", "rules", "prometheus-rules.test.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check above can fail: a rule with a bad expression is refused."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups:\n- name: x\n  rules:\n  - alert: A\n    expr: rate(foo[5m]\n")
    assert PROMTOOL, NEEDS_PROMTOOL
    proc = subprocess.run([PROMTOOL, "check", "rules", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0


def _exported_names() -> set[str]:
    """Sample names our services export (a stand-in engine state lets the worker's engine
    collector report its series)."""
    fake_engine = SimpleNamespace(
        block_manager=SimpleNamespace(num_free_blocks=1, num_blocks=2,
                                      stats=SimpleNamespace(num_queries=0, num_hits=0)),
        scheduler=SimpleNamespace(num_running=0, num_waiting=0), stats=EngineStats())
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",), "summary": ("_count", "_sum")}
    names: set[str] = set()
    for registry in (WorkerMetrics("m", "small", lambda: fake_engine).registry,
                     CacheMetrics().registry, RouterMetrics().registry):
        # families with labels but no series yet still name their samples by type
        for fam in text_string_to_metric_families(generate_latest(registry).decode()):
            names.update(fam.name + suffix for suffix in suffixes.get(fam.type, ("",)))
            names.update(s.name for s in fam.samples)
    return names


METRIC_RE = re.compile(r"\b(switchyard_[a-z0-9_]+)")


def _referenced(text: str) -> set[str]:
    return set(METRIC_RE.findall(text))


def test_rules_and_dashboard_name_only_exported_metrics():
    exported = _exported_names()
    rules = yaml.safe_load((OBS / "prometheus-rules.yaml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((OBS / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    used = set().union(*map(_referenced, exprs))
    assert len(used) >= 15
    missing = sorted(used - exported)
    assert not missing, f"rules/dashboard use metrics no service exports: {missing}"
    # recording rules used by the dashboard exist
    for e in exprs:
        for rec in re.findall(r"switchyard:[a-z0-9_:]+", e):
            assert rec in recorded, rec


def test_dashboard_covers_the_operator_views():
    dash = json.loads((OBS / "grafana-dashboard.json").read_text())
    titles = " | ".join(p["title"] for p in dash["panels"])
    for needed in ("TTFT", "TPOT", "Goodput", "Cache", "Tier mix", "KV cache", "Queue depth"):
        assert needed in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # histogram edges include the default SLO thresholds (so quantiles there are exact)
    exported = _exported_names()
    assert 'switchyard_worker_time_to_first_token_seconds_bucket' in exported


def test_router_histograms_take_the_slo_targets_as_edges():
    m = RouterMetrics(ttft_targets_s=[1.5, 0.75], tpot_targets_s=[0.06])
    m.ttft.labels("small", "hint").observe(1.2)
    m.tpot.labels("small", "hint").observe(0.05)
    text = generate_latest(m.registry).decode()
    assert 'switchyard_router_ttft_seconds_bucket{le="1.5",route="hint",tier="small"} 1.0' in text
    assert 'switchyard_router_ttft_seconds_bucket{le="0.75",route="hint",tier="small"} 0.0' in text
    assert 'switchyard_router_tpot_seconds_bucket{le="0.06",route="hint",tier="small"} 1.0' in text
