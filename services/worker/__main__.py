"""`python -m services.worker --model smollm2 --tier small --port 50061` starts one worker.

The command line is the only place the worker's configuration is read (plus an optional YAML
file whose keys are WorkerConfig field names; flags override it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import sys

import yaml

from services.common.telemetry import EXPORTERS, TracingConfig
from services.common.tls import ServerTls, TlsError
from services.worker.config import WorkerConfig
from services.worker.engine.config import CacheConfig
from services.worker.quant.config import SCHEME_NAMES


def parse_args(argv: list[str]) -> WorkerConfig:
    p = argparse.ArgumentParser(prog="python -m services.worker", description=__doc__)
    p.add_argument("--config", help="YAML file with WorkerConfig fields (flags override it)")
    p.add_argument("--model", help='a .gguf file, an HF folder, or "smollm2"')
    p.add_argument("--tier", choices=("small", "quantized", "large"))
    p.add_argument("--worker-id")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", help="cpu (default), cuda or cuda:<index>")
    p.add_argument("--quantization", choices=SCHEME_NAMES,
                   help="weight-only quantization of the linears (default none)")
    p.add_argument("--threads", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--max-waiting", type=int)
    p.add_argument("--drain-timeout-s", type=float)
    p.add_argument("--block-size", type=int)
    p.add_argument("--kv-cache-bytes", type=int, help="KV cache budget in bytes")
    p.add_argument("--kv-cache-fraction", type=float, help="fraction of available memory")
    p.add_argument("--num-kv-blocks", type=int)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-kv-prefault", action="store_true",
                   help="leave KV pages to be faulted in on first use (faster start, slower steps)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--trace-exporter", choices=sorted(EXPORTERS), help="span exporter (default none)")
    p.add_argument("--otlp-endpoint", help="host:port of an OTLP/gRPC collector")
    p.add_argument("--trace-file", help="JSON-lines span file (exporter 'file')")
    p.add_argument("--trace-sample-ratio", type=float)
    p.add_argument("--tls-cert-file", help="PEM certificate: serve TLS on --port")
    p.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")
    p.add_argument("--tls-ca-file", help="PEM CA that client certificates must chain to (mTLS)")
    p.add_argument("--tls-require-client-cert", action="store_true",
                   help="mTLS: refuse clients without a certificate signed by --tls-ca-file")
    p.add_argument("--health-port", type=int,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (probes)")
    args = p.parse_args(argv)

    values: dict = {}
    if args.config:
        with open(args.config) as f:
            values.update(yaml.safe_load(f) or {})
    cache = dict(values.pop("cache", {}) or {})
    tracing = dict(values.pop("tracing", {}) or {})
    for flag, key in (("trace_exporter", "exporter"), ("otlp_endpoint", "otlp_endpoint"),
                      ("trace_file", "file_path"), ("trace_sample_ratio", "sample_ratio")):
        if getattr(args, flag) is not None:
            tracing[key] = getattr(args, flag)
    tracing.setdefault("service_name", "worker")
    tls = dict(values.pop("tls", {}) or {})
    for flag, key in (("tls_cert_file", "cert_file"), ("tls_key_file", "key_file"),
                      ("tls_ca_file", "ca_file")):
        if getattr(args, flag) is not None:
            tls[key] = getattr(args, flag)
    if args.tls_require_client_cert:
        tls["require_client_cert"] = True
    for flag, key in (("block_size", "block_size"), ("kv_cache_bytes", "memory_bytes"),
                      ("kv_cache_fraction", "memory_fraction"), ("num_kv_blocks", "num_blocks")):
        if getattr(args, flag) is not None:
            cache[key] = getattr(args, flag)
    if args.no_prefix_caching:
        cache["enable_prefix_caching"] = False
    if args.no_kv_prefault:
        cache["prefault"] = False
    for f in dataclasses.fields(WorkerConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("cache", "tracing", "tls"):
            values[f.name] = value
    if "model" not in values:
        p.error("--model is required (or `model:` in --config)")
    values.setdefault("worker_id", "")
    try:
        server_tls = ServerTls(**tls) if tls else None
    except (TypeError, ValueError) as exc:
        p.error(f"tls: {exc}")
    config = WorkerConfig(cache=CacheConfig(**cache), tracing=TracingConfig(**tracing),
                          tls=server_tls, **values)
    if not config.worker_id:
        config = dataclasses.replace(config, worker_id=f"{config.tier}-{config.port}")
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("SWITCHYARD_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {config.worker_id} %(levelname)s %(name)s: %(message)s")
    from services.worker.server import WorkerServer  # after logging: imports torch

    try:
        asyncio.run(WorkerServer(config).run())
    except TlsError as exc:  # a certificate that cannot be used: say which, no traceback
        raise SystemExit(f"worker: {exc}") from None


if __name__ == "__main__":
    main()
