"""`switchyard`: run the whole cluster on one machine, talk to it, render its Kubernetes config.

  switchyard up [--config FILE]            start Redis, cache, workers and router; Ctrl-C stops
  switchyard ask "question" [--tier T]     stream one answer through the router, show its route
  switchyard chat                          a conversation through the router
  switchyard status                        tiers, replicas, load, cache hit rate, SLO attainment
  switchyard check-config [--config FILE]  validate a cluster config
  switchyard render-config --target k8s --out DIR   the files of the Kubernetes ConfigMap/Secret
  switchyard router --config router.yaml   the router with per-pod discovery (containers)

The cluster config is --config, else $SWITCHYARD_CONFIG, else services/cli/default.yaml.
This module is the only place the CLI reads the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config or os.environ.get("SWITCHYARD_CONFIG") or DEFAULT_CONFIG)


def _load(args: argparse.Namespace, target: str = "local", *, check_services: bool = True):
    """The cluster config; `check_services` also runs every service's own validation (the
    router's imports torch: seconds), which clients that only need addresses skip."""
    from services.cli.config import ConfigError, load_config

    try:
        return load_config(_config_path(args), target, check_services=check_services)
    except (OSError, ConfigError) as exc:
        sys.exit(f"switchyard: {exc}")


def cmd_up(args: argparse.Namespace) -> int:
    from services.cli.up import run_up

    config = _load(args)
    with tempfile.TemporaryDirectory(prefix="switchyard-") as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp)
        return asyncio.run(run_up(config, run_dir, dict(os.environ)))


def _ask_options(args: argparse.Namespace):
    from services.cli.client import AskOptions

    target, key = args.target, args.api_key or os.environ.get("SWITCHYARD_API_KEY")
    if target is None or key is None:
        config = _load(args, check_services=False)
        target = target or f"{config.host}:{config.router.grpc_port}"
        key = key or next(iter(config.tenants.values()))["api_keys"][0]
    return AskOptions(target=target, api_key=key, tier=args.tier, max_tokens=args.max_tokens,
                      temperature=args.temperature)


def cmd_ask(args: argparse.Namespace) -> int:
    from services.cli.client import ask

    return ask(_ask_options(args), args.prompt)


def cmd_chat(args: argparse.Namespace) -> int:
    from services.cli.client import chat

    return chat(_ask_options(args))


def cmd_status(args: argparse.Namespace) -> int:
    from services.cli.client import status

    return status(_load(args, check_services=False))


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args, args.target)
    tiers = ", ".join(f"{t.name} x{t.replicas} ({t.model}, {t.quantization})"
                      for t in config.tiers)
    print(f"{_config_path(args)}: ok ({args.target}): {tiers}; tenants: "
          f"{', '.join(config.tenants)}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from services.cli import render

    config = _load(args, args.target)
    if args.target == render.K8S:
        files = render.render_k8s(config, args.source or str(_config_path(args)))
    else:
        files = {f"worker-{t.name}.yaml": render.dump_yaml(
            render.worker_settings(config, t, render.LOCAL)) for t in config.tiers}
        files["router.yaml"] = render.dump_yaml(render.router_settings(config, render.LOCAL))
        if config.cache.enabled:
            files["cache.env"] = render.dump_env(render.cache_env(config, render.LOCAL))
    if args.out is None:
        for name, text in files.items():
            print(f"--- {name}\n{text}")
    else:
        for path in render.write_files(files, Path(args.out)):
            print(path)
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    from services.cli import router_main

    try:
        data = router_main.load_router_data(args.config, os.environ)
    except (OSError, ValueError) as exc:
        sys.exit(f"switchyard router: {exc}")
    logging.basicConfig(level=os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    import torch  # after the config checks: errors should not wait for torch

    torch.set_num_threads(1)  # the classifier's one thread; workers need the cores
    try:
        asyncio.run(router_main.serve(data, args.resolve_interval_s, args.drain_s))
    except ValueError as exc:  # RouterConfig's ConfigError
        sys.exit(f"switchyard router: {exc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchyard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help="cluster YAML (default: $SWITCHYARD_CONFIG or the "
                        "shipped services/cli/default.yaml)")
        return sp

    up = with_config(sub.add_parser("up", help="run the whole cluster here"))
    up.add_argument("--run-dir", help="where rendered settings go (default: a temp dir)")
    up.set_defaults(func=cmd_up)
    for name, func, hlp in (("ask", cmd_ask, "ask one question through the router"),
                            ("chat", cmd_chat, "chat through the router")):
        sp = with_config(sub.add_parser(name, help=hlp))
        if name == "ask":
            sp.add_argument("prompt")
        sp.add_argument("--target", help="router gRPC host:port (default: from the config)")
        sp.add_argument("--api-key", help="default: $SWITCHYARD_API_KEY or the config's first")
        sp.add_argument("--tier", default="auto", choices=("auto", "small", "quantized", "large"))
        sp.add_argument("--max-tokens", type=int, default=128)
        sp.add_argument("--temperature", type=float, default=0.0)
        sp.set_defaults(func=func)
    with_config(sub.add_parser("status", help="load, cache and SLO overview")).set_defaults(
        func=cmd_status)
    chk = with_config(sub.add_parser("check-config", help="validate a cluster config"))
    chk.add_argument("--target", choices=("local", "k8s"), default="local")
    chk.set_defaults(func=cmd_check)
    ren = with_config(sub.add_parser("render-config", help="render each service's settings"))
    ren.add_argument("--target", choices=("local", "k8s"), default="k8s")
    ren.add_argument("--out", help="directory to write (default: print)")
    ren.add_argument("--source", help="name of the source recorded in the files' header")
    ren.set_defaults(func=cmd_render)
    rt = sub.add_parser("router", help="run the router (with per-pod discovery)")
    rt.add_argument("--config", required=True, help="router YAML (services/router/config.py)")
    rt.add_argument("--resolve-interval-s", type=float, default=10.0)
    rt.add_argument("--drain-s", type=float, default=10.0)
    rt.set_defaults(func=cmd_router)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
