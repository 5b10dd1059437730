"""Hostile input on the router's OpenAI-compatible HTTP API, over real sockets: random bodies.

Random and missing fields, wrong types, NaN / infinite / negative / huge numbers, lone UTF-16
surrogates, unknown fields, arbitrary JSON documents and garbage bytes. Every request gets a
well-formed answer or an error with the right status and OpenAI's body {"error": {"message",
"type", "param", "code"}}; never a 500 or a hang. After each batch a normal request still
succeeds, and at the end every worker process is alive with all of its KV blocks free. Fixed
cases with their exact answers: test_hostile_http_cases.py.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.reliability import hostile, hostile_http
from tests.reliability.hostile import (
    NASTY_INTS,
    SETTINGS,
    hostile_floats,
    json_scalars,
    json_values,
    prompt_texts,
    small_ints,
    texts,
)
from tests.reliability.hostile_http import assert_serving, check, post_json, send

TALLY = hostile_http.TALLY
pytestmark = hostile.BACKGROUND_RANDOM


# --- strategies -----------------------------------------------------------------------------------
# A body is a valid request (hostile only in its text) with up to two fields replaced by
# hostile values, maybe a required field dropped, and maybe unknown fields added: enough valid
# requests reach the classifier, the cache and the workers, and each hostile value is tried
# next to otherwise sane ones.

def _anything() -> st.SearchStrategy:
    return st.one_of(json_scalars(), json_values(6))


def _unit() -> st.SearchStrategy:
    return st.one_of(hostile_floats(), _anything())


_ROLE_NAMES = ["system", "developer", "user", "assistant", "tool"]
_VALID_COMMON = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": small_ints(1, 50),
    "min_p": st.floats(0, 1), "seed": st.integers(0, 2**63 - 1),
    "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
    "stop": st.one_of(prompt_texts(), st.lists(prompt_texts(), max_size=3)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(), "n": st.just(1),
    "labels": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    "cache": st.fixed_dictionaries({"mode": st.sampled_from(["enabled", "disabled",
                                                             "lookup_only", "store_only"])},
                                   optional={"allow_sampled": st.booleans(),
                                             "min_similarity": st.floats(0, 1)}),
    "prompt_version": st.text(max_size=20), "user": st.text(max_size=20),
}
_HOSTILE_COMMON = {
    # Valid max_tokens stay tiny (each costs real decode steps); null means the default.
    "max_tokens": st.one_of(st.sampled_from(NASTY_INTS), st.integers(max_value=0),
                            st.integers(min_value=2000), hostile_floats(), st.none(),
                            _anything()),
    "max_completion_tokens": st.one_of(st.sampled_from(NASTY_INTS), _anything()),
    "model": st.one_of(st.sampled_from(["SMALL", "medium", "", "gpt-4", "\u017fmall"]),
                       _anything()),
    **{name: _unit() for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                                  "presence_penalty", "frequency_penalty")},
    **{name: st.one_of(st.sampled_from(NASTY_INTS), _anything()) for name in ("top_k", "seed",
                                                                               "n")},
    "stop": st.one_of(texts(20, surrogates=True), st.lists(texts(8, surrogates=True),
                                                           max_size=4), _anything()),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": _anything()}),
                                _anything()),
    "labels": st.one_of(st.dictionaries(texts(10, surrogates=True),
                                        texts(10, surrogates=True), max_size=3), _anything()),
    "cache": st.one_of(st.fixed_dictionaries({}, optional={
        "mode": _anything(), "allow_sampled": _anything(), "allow_semantic": _anything(),
        "min_similarity": _unit()}), _anything()),
    **{name: _anything() for name in ("stream", "ignore_eos", "prompt_version",
                                      "response_format", "tools", "logit_bias", "tool_choice",
                                      "echo", "best_of", "suffix", "user")},
}
_UNKNOWN = st.dictionaries(st.text(min_size=1, max_size=12).map(lambda s: "x-" + s),
                           _anything(), max_size=2)


def _message() -> st.SearchStrategy:
    return st.fixed_dictionaries({"role": st.sampled_from(_ROLE_NAMES),
                                  "content": prompt_texts()})


def _hostile_message() -> st.SearchStrategy:
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", ""]),
                                  "text": st.one_of(texts(surrogates=True), _anything())})
    content = st.one_of(texts(surrogates=True), st.lists(part, max_size=3), _anything())
    return st.one_of(_anything(), st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(_ROLE_NAMES + ["robot", "", "USER"]), _anything()),
         "content": content},
        optional={"name": st.one_of(texts(20, surrogates=True), _anything()),
                  "tool_calls": _anything()}))


def _mutated(valid: st.SearchStrategy[dict], hostile: dict,
             required: list[str]) -> st.SearchStrategy[dict]:
    """`valid` with 0-2 fields set to hostile values, maybe one required field dropped, and
    maybe unknown fields."""
    changes = st.lists(st.sampled_from(sorted(hostile)), max_size=2, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: hostile[n] for n in names}))
    dropped = st.lists(st.sampled_from(required), max_size=1)

    def build(body: dict, change: dict, drop: list, extra: dict) -> dict:
        body = {**extra, **body, **change}
        for name in drop:
            body.pop(name, None)
        return body
    return st.builds(build, valid, changes, dropped, _UNKNOWN)


def _chat_bodies() -> st.SearchStrategy[dict]:
    valid = st.fixed_dictionaries(
        {"model": st.sampled_from(["auto", "small", "large", "quantized"]),
         "messages": st.lists(_message(), min_size=1, max_size=3), "max_tokens": small_ints()},
        optional={**_VALID_COMMON, "logprobs": st.booleans(),
                  "top_logprobs": small_ints(0, 20)})
    hostile = {**_HOSTILE_COMMON,
               "messages": st.one_of(st.lists(_hostile_message(), max_size=3), _anything()),
               "logprobs": _anything(), "top_logprobs": st.one_of(small_ints(21, 99),
                                                                   _anything())}
    return _mutated(valid, hostile, ["model", "messages", "max_tokens"])


def _completion_bodies() -> st.SearchStrategy[dict]:
    valid = st.fixed_dictionaries(
        {"model": st.sampled_from(["auto", "small", "large", "quantized"]),
         "prompt": st.one_of(prompt_texts(), st.lists(prompt_texts(), min_size=1, max_size=1)),
         "max_tokens": small_ints()},
        optional={**_VALID_COMMON, "logprobs": small_ints(0, 5)})
    hostile = {**_HOSTILE_COMMON, "logprobs": st.one_of(small_ints(6, 99), _anything()),
               "prompt": st.one_of(texts(surrogates=True), st.lists(texts(surrogates=True),
                                                                    max_size=3),
                                   st.lists(st.integers(0, 50_000), max_size=4), _anything())}
    return _mutated(valid, hostile, ["model", "prompt", "max_tokens"])


# --- property tests -------------------------------------------------------------------------------

@settings(SETTINGS, max_examples=200)
@given(body=_chat_bodies(), tenant=st.sampled_from(["acme", "acme", "smallonly", "limited"]))
def test_random_chat_bodies(api, body, tenant):
    r = check(post_json(api, "/v1/chat/completions", body, tenant=tenant))
    if r.status == 200 and tenant == "smallonly" and not r.headers[
            "content-type"].startswith("text/event-stream"):
        assert r.json()["switchyard"]["tier"] == "small"


@settings(SETTINGS, max_examples=120)
@given(body=_completion_bodies())
def test_random_completion_bodies(api, body):
    check(post_json(api, "/v1/completions", body))


@settings(SETTINGS, max_examples=60)
@given(doc=json_values(20), path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_random_json_documents(api, doc, path):
    check(post_json(api, path, doc))


@settings(SETTINGS, max_examples=60)
@given(raw=st.one_of(st.binary(max_size=300),
                     st.text(max_size=100).map(lambda s: s.encode("utf-16")),
                     json_values(8).map(lambda d: json.dumps(d).encode()[:-1])))
def test_garbage_bytes(api, raw):
    r = check(send(api, "/v1/chat/completions", raw))
    assert r.status in (400, 404), r


def test_serving_after_random_batches(api):
    assert_serving(api)


def test_zz_cluster_survived(api, cluster):
    """Last in the module: the router still serves and no worker died or leaked KV blocks."""
    assert_serving(api)
    hostile.assert_workers_alive_and_idle(cluster)
    assert TALLY.crashed["http"] == 0, TALLY.lines()
