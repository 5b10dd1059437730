"""The worker over real gRPC on loopback (tiny random Llama + SmolLM2's tokenizer)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from switchyard.common.v1 import common_pb2
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.worker.config import WorkerConfig
from services.worker.engine.config import CacheConfig
from services.worker.server import WorkerServer


@contextlib.contextmanager
def running_worker(model_dir, **overrides):
    """Starts a WorkerServer on its own event loop thread; yields (stub, channel, server, loop)."""
    fields = dict(model=str(model_dir), port=0, worker_id="test-0", max_model_len=256,
                  cache=CacheConfig(block_size=16, num_blocks=128), drain_timeout_s=10.0)
    fields.update(overrides)
    server = WorkerServer(WorkerConfig(**fields))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    asyncio.run_coroutine_threadsafe(server.load(), loop).result(60)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield worker_pb2_grpc.WorkerServiceStub(channel), channel, server, loop
    finally:
        channel.close()
        if not server.servicer.draining:
            asyncio.run_coroutine_threadsafe(server.drain_and_stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    with running_worker(tiny_model_dir) as w:
        yield w


def _req(rid=None, prompt="The quick brown fox jumps over the lazy dog.", max_tokens=16, **sampling):
    sampling.setdefault("temperature", 0.0)
    return worker_pb2.GenerateRequest(
        request_id=rid or f"r{random.getrandbits(48)}", prompt=prompt, max_tokens=max_tokens,
        sampling=common_pb2.SamplingParams(**sampling))


def _collect(stream):
    chunks, final = [], None
    for msg in stream:
        assert final is None, "nothing may follow the complete message"
        if msg.WhichOneof("kind") == "chunk":
            chunks.append(msg.chunk)
        else:
            final = msg
    return chunks, final


def _wait_idle(stub, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        load = stub.GetLoad(worker_pb2.GetLoadRequest())
        if (load.num_running, load.num_waiting, load.kv_blocks_free) == (0, 0, load.kv_blocks_total):
            return load
        assert time.monotonic() < deadline, load
        time.sleep(0.05)


def test_stream_order_text_and_usage(worker, smollm2_tokenizer):
    stub = worker[0]
    prompt = "Once upon a time in a land far away"
    chunks, final = _collect(stub.Generate(_req(prompt=prompt, max_tokens=20, ignore_eos=True)))
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 20
    assert "".join(c.text for c in chunks) == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    c = final.complete
    assert c.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (
        len(smollm2_tokenizer.encode(prompt)), 20)
    assert 0 < c.timings.ttft_ms <= c.timings.total_ms and c.model_id


def test_same_seed_same_output(worker):
    stub = worker[0]
    runs = [_collect(stub.Generate(_req(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)))
            for s in (5, 5, 6)]
    ids = [[t for c in chunks for t in c.token_ids] for chunks, _ in runs]
    assert ids[0] == ids[1] != ids[2]


def test_stop_string_truncates_and_reports(worker):
    stub = worker[0]
    chunks, _ = _collect(stub.Generate(_req(max_tokens=30, ignore_eos=True)))
    text = "".join(c.text for c in chunks)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    chunks, final = _collect(stub.Generate(_req(max_tokens=30, ignore_eos=True, stop=[stop])))
    assert "".join(c.text for c in chunks) == text[: text.index(stop)]
    assert final.complete.finish_reason == common_pb2.FINISH_REASON_STOP
    assert final.complete.stop_reason == stop


def test_chat_request_and_logprobs(worker):
    stub = worker[0]
    req = worker_pb2.GenerateRequest(
        request_id="chat-1", max_tokens=4,
        chat=common_pb2.Conversation(messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")]),
        sampling=common_pb2.SamplingParams(temperature=0.0, logprobs=3, ignore_eos=True))
    chunks, final = _collect(stub.Generate(req))
    lps = [lp for c in chunks for lp in c.logprobs]
    assert len(lps) == 4 and all(len(lp.top) == 3 for lp in lps)
    # Greedy: the sampled token is the top-1 alternative.
    assert all(lp.token_id == lp.top[0].token_id for lp in lps)
    assert final.complete.usage.prompt_tokens > 20  # the template's system prompt is included


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.ClearField("prompt"), "input"),
    (lambda r: setattr(r, "prompt", ""), "prompt"),
    (lambda r: setattr(r, "request_id", ""), "request_id"),
    (lambda r: setattr(r, "prompt", "word " * 300), "max_tokens"),  # prompt past the context
    (lambda r: setattr(r, "max_tokens", 0), "max_tokens"),
    (lambda r: setattr(r, "max_tokens", 10_000), "max_tokens"),
    (lambda r: setattr(r.sampling, "temperature", -0.5), "sampling.temperature"),
    (lambda r: setattr(r.sampling, "temperature", float("nan")), "sampling.temperature"),
    (lambda r: setattr(r.sampling, "top_p", 0.0), "sampling.top_p"),
    (lambda r: setattr(r.sampling, "top_p", 1.5), "sampling.top_p"),
    (lambda r: setattr(r.sampling, "top_k", 0), "sampling.top_k"),
    (lambda r: setattr(r.sampling, "logprobs", 50), "sampling.logprobs"),
])
def test_invalid_arguments(worker, mutate, field):
    stub = worker[0]
    req = _req()
    mutate(req)
    with pytest.raises(grpc.RpcError) as info:
        _collect(stub.Generate(req))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    _, final = _collect(stub.Generate(_req(max_tokens=2)))  # still serving
    assert final.complete.usage.completion_tokens >= 1


def test_unknown_fields_are_rejected(worker):
    channel = worker[1]
    raw = channel.unary_stream("/switchyard.worker.v1.WorkerService/Generate",
                               request_serializer=lambda b: b,
                               response_deserializer=worker_pb2.GenerateResponse.FromString)
    body = _req().SerializeToString() + bytes([0x98, 0x06, 0x01])  # field 99, varint 1
    with pytest.raises(grpc.RpcError) as info:
        list(raw(body))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "99" in info.value.details()


def test_abort_rpc_ends_stream_and_frees_blocks(worker):
    stub = worker[0]
    stream = stub.Generate(_req(rid="to-abort", max_tokens=200, ignore_eos=True))
    first = next(stream)
    assert first.WhichOneof("kind") == "chunk"
    assert stub.Abort(worker_pb2.AbortRequest(request_id="to-abort")).found
    _, final = _collect(stream)
    assert final.complete.finish_reason == common_pb2.FINISH_REASON_ABORT
    assert not stub.Abort(worker_pb2.AbortRequest(request_id="to-abort")).found
    _wait_idle(stub)


def test_client_disconnects_free_every_block(worker):
    """A hundred streams cancelled at random points, ten in flight at a time; each cancel must
    abort its request in the engine (none could finish on its own: 150+ tokens each)."""
    stub, _, server, _ = worker
    stats = server.servicer.engine.engine.stats
    before = stats.aborted_requests
    rng = random.Random(3)
    started = 0  # calls that streamed a chunk, so surely reached the engine
    for batch in range(10):
        calls = [(stub.Generate(_req(rid=f"dc{batch}-{i}", max_tokens=rng.randint(150, 200),
                                     ignore_eos=True, prompt="lorem ipsum " * rng.randint(1, 8))),
                  rng.randint(0, 4)) for i in range(10)]
        for call, keep in calls:
            for _ in range(keep):
                assert next(call).WhichOneof("kind") == "chunk"
            started += keep > 0
            call.cancel()
    load = _wait_idle(stub)
    assert load.serving
    # A call cancelled before its first message may never have reached the engine.
    assert started <= stats.aborted_requests - before <= 100


def test_health_load_and_reflection(worker):
    stub, channel, server, _ = worker
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "switchyard.worker.v1.WorkerService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    load = stub.GetLoad(worker_pb2.GetLoadRequest())
    assert (load.worker_id, load.tier, load.kv_blocks_total, load.kv_block_size,
            load.max_context_tokens, load.serving) == (
        "test-0", common_pb2.TIER_SMALL, 128, 16, 256, True)
    watch = stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=50))
    snaps = [next(watch), next(watch)]
    watch.cancel()
    assert snaps[1].timestamp_unix_ms > snaps[0].timestamp_unix_ms
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"switchyard.worker.v1.WorkerService", "grpc.health.v1.Health"} <= names


def test_queue_full_is_resource_exhausted(tiny_model_dir):
    with running_worker(tiny_model_dir, max_num_seqs=1, max_waiting=1) as (stub, _, _, _):
        running = stub.Generate(_req(rid="a", max_tokens=200, ignore_eos=True))
        next(running)  # admitted and running
        waiting = stub.Generate(_req(rid="b", max_tokens=200, ignore_eos=True))
        deadline = time.monotonic() + 10
        while stub.GetLoad(worker_pb2.GetLoadRequest()).num_waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as info:
            _collect(stub.Generate(_req(rid="c")))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_waiting" in info.value.details()
        running.cancel()
        waiting.cancel()
        _wait_idle(stub)


def test_drain_finishes_in_flight_and_refuses_new(tiny_model_dir):
    with running_worker(tiny_model_dir) as (stub, channel, server, loop):
        stream = stub.Generate(_req(rid="inflight", max_tokens=60, ignore_eos=True))
        next(stream)
        drained = asyncio.run_coroutine_threadsafe(server.drain_and_stop(), loop)
        deadline = time.monotonic() + 5
        while not server.servicer.draining:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service="")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            _collect(stub.Generate(_req(rid="late")))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks, final = _collect(stream)
        assert final.complete.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert final.complete.usage.completion_tokens == 60
        drained.result(30)
