"""`python -m services.router --config router.yaml` starts a router (gRPC + OpenAI HTTP API).

The YAML file is the only configuration (see services/router/config.py and
services/router/router.example.yaml); --grpc-port / --http-port override its ports.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.router", description=__doc__)
    p.add_argument("--config", required=True, help="router YAML file")
    p.add_argument("--grpc-port", type=int)
    p.add_argument("--http-port", type=int)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from services.router.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        overrides = {k: v for k, v in (("grpc_port", args.grpc_port),
                                       ("http_port", args.http_port)) if v is not None}
        config = dataclasses.replace(config, **overrides)
    except (OSError, ConfigError) as exc:
        p.error(str(exc))
    logging.basicConfig(level=os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO"),
                        format="%(asctime)s router %(levelname)s %(name)s: %(message)s")
    import torch  # after parsing: argument errors should not wait for torch

    # The classifier runs on one executor thread; more intra-op threads oversubscribe the
    # cores the workers need.
    torch.set_num_threads(1)
    from services.router.server import RouterServer

    asyncio.run(RouterServer(config).run())


if __name__ == "__main__":
    main()
