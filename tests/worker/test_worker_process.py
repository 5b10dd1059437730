"""`python -m services.worker` as a real process: readiness, and SIGTERM drains before exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from switchyard.common.v1 import common_pb2
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.worker.client import wait_serving


def test_sigterm_drains_in_flight_requests_then_exits(tiny_model_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", SWITCHYARD_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.worker", "--model", str(tiny_model_dir), "--port", "0",
         "--max-model-len", "512", "--num-kv-blocks", "64", "--drain-timeout-s", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line
        target = line.split("listening on ")[1].split()[0]
        with grpc.insecure_channel(target) as channel:
            wait_serving(channel, 60)
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            stream = stub.Generate(worker_pb2.GenerateRequest(
                request_id="long", prompt="hello there", max_tokens=300,
                sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)))
            assert next(stream).WhichOneof("kind") == "chunk"
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with grpc.insecure_channel(target) as other:
                late = worker_pb2_grpc.WorkerServiceStub(other).Generate(
                    worker_pb2.GenerateRequest(request_id="late", prompt="hi", max_tokens=2))
                try:
                    list(late)
                    raise AssertionError("a draining worker accepted a new request")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
            final = [m for m in stream][-1]
            assert final.complete.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert final.complete.usage.completion_tokens == 300
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_that_cannot_load_exits_nonzero(tiny_model_dir):
    """--device cuda on a machine without CUDA: a clear error and exit status 1, not a worker
    stuck in NOT_SERVING."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda loads")
    env = dict(os.environ, OMP_NUM_THREADS="1", SWITCHYARD_LOG_LEVEL="WARNING")
    proc = subprocess.run(
        [sys.executable, "-m", "services.worker", "--model", str(tiny_model_dir), "--port", "0",
         "--device", "cuda"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sees no CUDA device" in proc.stdout + proc.stderr
