"""Prompts and answers stay out of logs and traces.

Requests with distinctive prompts go through router -> cache -> worker (gRPC and the HTTP API,
a miss, an exact hit, and a semantic near miss the cache's guard rejects) with every logger at
DEBUG: the router's and the cache's records (in this process, captured), the worker process's
output, and every span the three services export (file exporter). None of them may hold a
word of a prompt or the text of an answer.

The near miss matters: the guard explains a rejection by the words that differ ("entities not
in both: [...]"), and that reason was a span attribute of cache.Lookup. It now names the rule
only unless the cache's `record_request_text` allows request text.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from switchyard.cache.v1 import cache_pb2, cache_pb2_grpc
from switchyard.common.v1 import common_pb2

from tests.reliability.parts import ConfiguredWorker, start_cache
from tests.router.conftest import router_config
from tests.router.helpers import complete, generate, request

SMALL = common_pb2.TIER_SMALL
FIRST = "Write a short poem about the Zorblatt marmalade festival in Quillington."
NEAR_MISS = "Write a short poem about the Zorblatt marmalade festival in Vexmoor."
"""Cosine ~0.87 with FIRST (over the 0.85 threshold): only the guard's entity rule tells
them apart, and its detail would quote "quillington" and "vexmoor"."""
HTTP_PROMPT = "Summarise the Plimbrook accords on snorkelwort tariffs."
SECRET_WORDS = ("zorblatt", "marmalade", "quillington", "vexmoor", "plimbrook", "snorkelwort")
CLIENT_LOGGERS = ("openai", "httpx", "httpcore")
"""The test's own HTTP client logs its requests at DEBUG; it is not part of the cluster."""


@pytest.fixture(scope="module")
def spans_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spans")


@pytest.fixture(scope="module")
def cluster_parts(tiny_models, redis_url, make_router, spans_dir, tmp_path_factory) -> Iterator:
    worker = ConfiguredWorker(
        str(tiny_models[0]), "privacy-0", tmp_path_factory.mktemp("privacy-worker"),
        {"tracing": {"exporter": "file", "file_path": str(spans_dir / "worker.jsonl")}},
        log_level="DEBUG")
    worker.wait_serving()
    cache = start_cache(redis_url, trace_exporter="file", trace_file=spans_dir / "cache.jsonl")
    router = make_router(router_config(
        {"small": [worker.address]}, cache_target=f"127.0.0.1:{cache.port}",
        tracing={"exporter": "file", "file_path": str(spans_dir / "router.jsonl")}))
    yield worker, cache, router
    cache.stop(0.5)
    worker.stop()


def _spans(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_spans(spans_dir: Path, want: dict[str, int], timeout: float = 20.0) -> dict:
    """Waits until each span name in `want` was exported at least that many times (the batch
    processors export every 0.5 s); returns all spans by file."""
    deadline = time.monotonic() + timeout
    while True:
        found = {p.stem: _spans(p) for p in spans_dir.glob("*.jsonl")}
        names = [s["name"] for spans in found.values() for s in spans]
        if all(names.count(n) >= k for n, k in want.items()):
            return found
        assert time.monotonic() < deadline, f"spans missing: want {want}, have {names}"
        time.sleep(0.1)


SAMPLED = common_pb2.CachePolicy(allow_sampled=True)
"""Sampled answers, cached: the tiny model's greedy answers are blank lines, which would leave
no answer text to look for; sampled ones are random word pieces."""


def _chat(text: str):
    req = request(chat=[("user", text)], hint=SMALL, prompt_version="privacy@1", max_tokens=12,
                  ignore_eos=True, temperature=1.0, cache=SAMPLED)
    req.sampling.seed = 7
    return req


def test_prompts_and_answers_reach_no_log_and_no_span(cluster_parts, spans_dir, caplog):
    worker, cache, router = cluster_parts
    caplog.set_level(logging.DEBUG)
    chunks, final = generate(router, _chat(FIRST))
    answers = ["".join(c.text for c in chunks)]
    assert final.route.cache_result == common_pb2.CACHE_RESULT_MISS
    deadline = time.monotonic() + 10
    while complete(router, _chat(FIRST)).route.cache_result \
            != common_pb2.CACHE_RESULT_EXACT:  # the answer was stored (Store ran)
        assert time.monotonic() < deadline, "the first answer was never stored"
        time.sleep(0.05)
    near = complete(router, _chat(NEAR_MISS))
    assert near.route.cache_result == common_pb2.CACHE_RESULT_MISS, near.route
    answers.append(near.text)
    http = router.openai().chat.completions.create(
        model="small", max_tokens=12, seed=7,
        messages=[{"role": "user", "content": HTTP_PROMPT}],
        extra_body={"ignore_eos": True})
    answers.append(http.choices[0].message.content)

    spans = _wait_spans(spans_dir, {"router.request": 4, "cache.Lookup": 3, "cache.Store": 2,
                                    "worker.Generate": 3})
    # The guard did reject the near miss, and its reason is traced, without the words.
    reasons = [s["attributes"].get("switchyard.cache.reason", "") for s in spans["cache"]
               if s["name"] == "cache.Lookup"]
    assert any(r.startswith("entity mismatch") for r in reasons), reasons

    records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    assert any(r.name.startswith("services.router") and r.levelno == logging.DEBUG
               for r in records), "router DEBUG records were not captured"
    assert "KV cache:" in worker.text()  # the worker's log lines were captured
    haystacks = {
        "router and cache logs": "\n".join(
            f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in records),
        "worker output": worker.text(),
        **{f"{name} spans": json.dumps(found) for name, found in spans.items()},
    }
    answers = [a.strip() for a in answers if len(a.strip()) >= 8]  # short ones match anything
    assert answers, "the answers are too short to look for"
    for where, text in haystacks.items():
        lowered = text.lower()
        leaked = [w for w in SECRET_WORDS if w in lowered]
        leaked += [a for a in answers if a.lower() in lowered]
        assert not leaked, f"{where} hold request text: {leaked}"


def _cache_query(text: str) -> cache_pb2.CacheQuery:
    return cache_pb2.CacheQuery(
        scope=cache_pb2.CacheScope(tenant="privacy", model_id="auto", model_version="v1"),
        chat=common_pb2.Conversation(messages=[common_pb2.ChatMessage(
            role=common_pb2.ROLE_USER, content=text)]),
        sampling=common_pb2.SamplingParams(temperature=0.0), max_tokens=12)


ENTRY = cache_pb2.CacheEntry(
    text="An answer.", token_ids=[1, 2], usage=common_pb2.Usage(prompt_tokens=9,
                                                                completion_tokens=2),
    tier=common_pb2.TIER_SMALL, model_id="tiny", finish_reason=common_pb2.FINISH_REASON_STOP,
    stop_reason="2")


@pytest.mark.parametrize("record", [False, True])
def test_guard_reasons_quote_request_text_only_when_configured(redis_url, record):
    """The cache's record_request_text is what gates the guard's detail (the differing words)
    in lookup reasons, and so in cache.Lookup's span attribute."""
    cache = start_cache(redis_url, record_request_text=record)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{cache.port}") as ch:
            stub = cache_pb2_grpc.CacheServiceStub(ch)
            assert stub.Store(cache_pb2.StoreRequest(query=_cache_query(FIRST), entry=ENTRY),
                              timeout=10).stored
            deadline = time.monotonic() + 5
            while True:  # the vector index learns of the entry through Redis pub/sub
                miss = stub.Lookup(cache_pb2.LookupRequest(query=_cache_query(NEAR_MISS)),
                                   timeout=10)
                if "mismatch" in miss.reason:
                    break
                assert time.monotonic() < deadline, miss
                time.sleep(0.05)
    finally:
        cache.stop(0.5)
    assert miss.result == common_pb2.CACHE_RESULT_MISS
    detail = "entities not in both: ['quillington', 'vexmoor']"
    assert (detail in miss.reason) == record, miss.reason
    assert miss.reason.startswith("entity mismatch")
