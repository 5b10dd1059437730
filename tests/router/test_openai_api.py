"""The OpenAI-compatible API through the official `openai` client, SmolLM2 on the small tier."""

from __future__ import annotations

import logging
import time

import httpx2 as httpx
import openai
import pytest

from services.common.assets import smollm2_gguf_path
from tests.router.conftest import KEYS, Worker, router_config

pytestmark = pytest.mark.slow  # loads SmolLM2 (~7 s)

NO_CACHE = {"cache": {"mode": "disabled"}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_router(cluster, make_router, cache_target, tmp_path_factory):
    smol = Worker(str(smollm2_gguf_path()), "smol-0", "small",
                  tmp=tmp_path_factory.mktemp("smol"))
    smol.wait_serving()
    router = make_router(router_config({"small": [smol.address],
                                        "large": [w.address for w in cluster["large"]]},
                                       cache_target=cache_target))
    yield router
    smol.stop()


def test_models_list(smol_router):
    ids = [m.id for m in smol_router.openai().models.list().data]
    assert ids == ["auto", "small", "large"]
    assert [m.id for m in smol_router.openai("smallonly").models.list().data] == ["auto", "small"]


def test_chat_completion_and_prefix_cached_usage(smol_router):
    client = smol_router.openai()
    first = client.chat.completions.create(model="small", messages=QUESTION, max_tokens=12,
                                           temperature=0, extra_body=NO_CACHE)
    assert "Paris" in first.choices[0].message.content
    assert first.model == "small" and first.object == "chat.completion"
    assert first.choices[0].finish_reason in ("stop", "length")
    u = first.usage
    assert u.prompt_tokens > 20 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    route = first.model_extra["switchyard"]
    assert (route["tier"], route["replica"], route["route"]) == ("small", "smol-0", "hint")
    # Same prompt again: the worker's prefix cache serves whole blocks of it.
    second = client.chat.completions.create(model="small", messages=QUESTION, max_tokens=12,
                                            temperature=0, extra_body=NO_CACHE)
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


def test_streaming_chat_matches_and_reports_usage(smol_router):
    client = smol_router.openai()
    whole = client.chat.completions.create(model="auto", messages=QUESTION, max_tokens=12,
                                           temperature=0, extra_body=NO_CACHE)
    events = list(client.chat.completions.create(
        model="auto", messages=QUESTION, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=NO_CACHE))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content
    assert events[0].choices[0].delta.role == "assistant"
    finals = [e for e in events if e.choices and e.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["switchyard"]["route"] == "classifier"
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == \
        whole.usage.completion_tokens


def test_text_completions_stream_and_not(smol_router):
    client = smol_router.openai()
    resp = client.completions.create(model="small", prompt="The capital of France is",
                                     max_tokens=6, temperature=0, extra_body=NO_CACHE)
    assert resp.object == "text_completion" and resp.choices[0].text
    chunks = list(client.completions.create(model="small", prompt="The capital of France is",
                                            max_tokens=6, temperature=0, stream=True,
                                            extra_body=NO_CACHE))
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text
    lp = client.completions.create(model="small", prompt="The capital of France is",
                                   max_tokens=3, temperature=0, logprobs=2, extra_body=NO_CACHE)
    assert len(lp.choices[0].logprobs.token_logprobs) == 3
    assert all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs)


def test_response_cache_through_the_api(smol_router):
    client = smol_router.openai()
    msgs = [{"role": "user", "content": "Name one primary color."}]
    first = client.chat.completions.create(model="small", messages=msgs, max_tokens=8,
                                           temperature=0)
    assert first.model_extra["switchyard"]["cache_result"] == "miss"
    deadline = time.monotonic() + 5
    while True:
        hit = client.chat.completions.create(model="small", messages=msgs, max_tokens=8,
                                             temperature=0)
        if hit.model_extra["switchyard"]["cache_result"] == "exact":
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert hit.choices[0].message.content == first.choices[0].message.content
    assert hit.usage.completion_tokens == first.usage.completion_tokens


@pytest.mark.parametrize("kwargs, error, status, param", [
    ({"model": "gpt-4"}, openai.NotFoundError, 404, "model"),
    ({"temperature": -1}, openai.BadRequestError, 400, "temperature"),
    ({"n": 2}, openai.BadRequestError, 400, "n"),
    ({"max_tokens": 5000}, openai.BadRequestError, 400, "max_tokens"),  # past the context
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, openai.BadRequestError, 400,
     "tools"),
])
def test_errors_have_openai_shape(smol_router, kwargs, error, status, param):
    args = {"model": "small", "messages": QUESTION, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        smol_router.openai().chat.completions.create(**args)
    assert info.value.status_code == status
    assert info.value.body["param"] == param and info.value.body["message"]


def test_unreadable_body_and_metrics_endpoint(smol_router):
    base = smol_router.base_url.removesuffix("/v1")
    r = httpx.post(f"{base}/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEYS['acme']}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    metrics = httpx.get(f"{base}/metrics").text
    assert "switchyard_router_goodput_requests_total" in metrics


def test_http_stream_disconnect_aborts_the_worker_request(smol_router, cluster, caplog):
    large = cluster["large"][0]
    with caplog.at_level(logging.INFO, logger="services.router"):
        with smol_router.openai().chat.completions.create(
                model="large", messages=QUESTION, max_tokens=900, stream=True,
                extra_body={"ignore_eos": True, **NO_CACHE}) as stream:
            next(iter(stream))
            assert large.load().num_running == 1
        start = time.monotonic()
        large.wait_idle(timeout=2.0)  # a full run would take ~5 s
        assert time.monotonic() - start < 2.0
    # A client leaving is not a server error: the handler is cancelled (or, when the close races
    # a write, gets ConnectionResetError) and nothing is logged at ERROR, no 500 attempted.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_deadline_header_gives_504(smol_router):
    with pytest.raises(openai.APIStatusError) as info:
        smol_router.openai().chat.completions.create(
            model="large", messages=QUESTION, max_tokens=900, extra_body={
                "ignore_eos": True, **NO_CACHE},
            extra_headers={"X-Request-Timeout-Ms": "300"})
    assert info.value.status_code == 504
    assert info.value.body["code"] == "deadline_exceeded"
