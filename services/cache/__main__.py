"""`python -m services.cache --redis-url redis://127.0.0.1:6379/0 --port 50070` starts a cache.

The only place the cache's configuration is read: command-line flags, each with an environment
fallback SWITCHYARD_CACHE_<FLAG> (e.g. SWITCHYARD_CACHE_REDIS_URL); flags win.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from services.cache.config import CacheConfig
from services.cache.domain import CacheMode

ENV_PREFIX = "SWITCHYARD_CACHE_"


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _mode(text: str) -> CacheMode:
    try:
        return CacheMode[text.upper()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected one of enabled, disabled, lookup_only, "
                                         f"store_only; got {text!r}") from None


_PARSERS = {int: int, float: float, bool: _bool, str: str, CacheMode: _mode, Path: Path}


def _field_type(f: dataclasses.Field) -> type:
    name = str(f.type).replace(" | None", "")
    return {"int": int, "float": float, "bool": bool, "str": str, "CacheMode": CacheMode,
            "Path": Path}[name]


def parse_args(argv: list[str], env: dict[str, str]) -> CacheConfig:
    """Builds a CacheConfig from flags (one per field) and SWITCHYARD_CACHE_* variables."""
    p = argparse.ArgumentParser(prog="python -m services.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(CacheConfig):
        kind = _field_type(f)
        p.add_argument("--" + f.name.replace("_", "-"), type=_PARSERS[kind], default=None,
                       metavar=kind.__name__.upper(),
                       help=f"default {f.default!r}; env {ENV_PREFIX}{f.name.upper()}")
    args = p.parse_args(argv)
    values = {}
    for f in dataclasses.fields(CacheConfig):
        value = getattr(args, f.name)
        raw = env.get(ENV_PREFIX + f.name.upper())
        if value is None and raw is not None:
            try:
                value = _PARSERS[_field_type(f)](raw)
            except (ValueError, argparse.ArgumentTypeError) as e:
                p.error(f"{ENV_PREFIX}{f.name.upper()}: {e}")
        if value is not None:
            values[f.name] = value
    try:
        return CacheConfig(**values)
    except ValueError as e:
        p.error(str(e))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(sys.argv[1:] if argv is None else argv, dict(os.environ))
    logging.basicConfig(level=os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s cache %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # after parsing: argument errors should not wait for torch

    # One intra-op thread: RPC threads embed concurrently; more threads oversubscribe 2 cores.
    torch.set_num_threads(1)
    from services.cache.server import CacheServer, load_embedder

    server = CacheServer(config, load_embedder(config))
    server.start()
    # torch, transformers and the model leave ~10^6 long-lived objects; a full GC pass over them
    # takes tens of ms and would land on a request. Exempt everything alive now from GC.
    gc.collect()
    gc.freeze()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
