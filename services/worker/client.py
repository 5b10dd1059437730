"""`python -m services.worker.client "message"`: stream a chat answer from a worker over gRPC.

Waits for the worker's health check to report SERVING (models take seconds to load), then
prints the answer as it streams and a one-line summary (finish reason, usage, timings).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc


def wait_serving(channel: grpc.Channel, timeout_s: float) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not SERVING after {timeout_s:.0f} s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.worker.client", description=__doc__)
    p.add_argument("message")
    p.add_argument("--target", default="127.0.0.1:50061")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--wait-s", type=float, default=120.0)
    args = p.parse_args(argv)

    with grpc.insecure_channel(args.target) as channel:
        wait_serving(channel, args.wait_s)
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        req = worker_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex,
            chat=common_pb2.Conversation(messages=[
                common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=args.message)]),
            sampling=common_pb2.SamplingParams(temperature=args.temperature),
            max_tokens=args.max_tokens,
        )
        try:
            for resp in stub.Generate(req):
                kind = resp.WhichOneof("kind")
                if kind == "chunk":
                    sys.stdout.write(resp.chunk.text)
                    sys.stdout.flush()
                elif kind == "complete":
                    c = resp.complete
                    print(f"\n[{common_pb2.FinishReason.Name(c.finish_reason)} | "
                          f"{c.usage.prompt_tokens} prompt + {c.usage.completion_tokens} "
                          f"completion tokens ({c.usage.cached_prompt_tokens} cached) | "
                          f"TTFT {c.timings.ttft_ms:.0f} ms, total {c.timings.total_ms:.0f} ms | "
                          f"{c.model_id}]")
                elif kind == "error":
                    print(f"\nerror: {resp.error.message}", file=sys.stderr)
                    return 1
        except grpc.RpcError as exc:
            print(f"\n{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
