"""Sync helpers for calling a router over gRPC in tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
from switchyard.common.v1 import common_pb2
from switchyard.router.v1 import router_pb2, router_pb2_grpc
from switchyard.worker.v1 import worker_pb2

from tests.router.conftest import KEYS

EASY = "What's the capital of Italy?"
HARD = ("Prove that every group of order 15 is cyclic, and explain each step of the Sylow "
        "argument you use.")
MEDIUM = ("Write a Python function that reads a CSV file and returns the average of the "
          "\"price\" column, skipping rows where the price is missing.")


def md(tenant: str = "acme") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def request(prompt: str | None = None, *, chat: list[tuple[str, str]] | None = None,
            max_tokens: int = 4, temperature: float | None = 0.0, hint: int = 0,
            ignore_eos: bool = False, **fields) -> router_pb2.GenerateRequest:
    roles = {"system": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER}
    sampling = common_pb2.SamplingParams(ignore_eos=ignore_eos)
    if temperature is not None:
        sampling.temperature = temperature
    req = router_pb2.GenerateRequest(max_tokens=max_tokens, sampling=sampling, tier_hint=hint,
                                     **fields)
    if chat is not None:
        req.chat.CopyFrom(common_pb2.Conversation(messages=[
            common_pb2.ChatMessage(role=roles[r], content=c) for r, c in chat]))
    else:
        req.prompt = prompt
    return req


def stub(router) -> router_pb2_grpc.RouterServiceStub:
    return router_pb2_grpc.RouterServiceStub(router.channel)


def complete(router, req, tenant: str = "acme", **kw) -> router_pb2.CompleteResponse:
    return stub(router).Complete(req, metadata=md(tenant), timeout=kw.pop("timeout", 60), **kw)


def generate(router, req, tenant: str = "acme", **kw) -> tuple[list, router_pb2.Final]:
    msgs = list(stub(router).Generate(req, metadata=md(tenant), timeout=kw.pop("timeout", 60),
                                      **kw))
    assert msgs[-1].WhichOneof("kind") == "final"
    return [m.chunk for m in msgs[:-1]], msgs[-1].final


def rpc_error(fn: Callable, *args, **kw) -> grpc.RpcError:
    try:
        fn(*args, **kw)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("expected an RPC error")


class Load:
    """Keeps `n` long generations running directly on a worker (bypassing the router)."""

    def __init__(self, worker, n: int, max_tokens: int = 400):
        self.calls = [worker.stub.Generate(worker_pb2.GenerateRequest(
            request_id=f"load-{worker.worker_id}-{i}-{time.monotonic_ns()}",
            prompt="lorem ipsum dolor sit amet " * 4, max_tokens=max_tokens,
            sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)))
            for i in range(n)]
        self.threads = [threading.Thread(target=self._drain, args=(c,), daemon=True)
                        for c in self.calls]
        for t in self.threads:
            t.start()
        self.worker = worker
        deadline = time.monotonic() + 20
        while worker.load().num_running + worker.load().num_waiting < n:
            assert time.monotonic() < deadline, "load did not start"
            time.sleep(0.02)

    @staticmethod
    def _drain(call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError:
            pass

    def stop(self) -> None:
        for c in self.calls:
            c.cancel()
        for t in self.threads:
            t.join(5)
        self.worker.wait_idle()
        time.sleep(0.2)  # routers see the idle worker in their next WatchLoad snapshot
