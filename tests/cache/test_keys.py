"""Key canonicalization and policy resolution (pure functions; no Redis, no model)."""

from __future__ import annotations

import dataclasses

import pytest

from services.cache.config import CacheConfig
from services.cache.domain import (
    CacheMode,
    InvalidArgument,
    Message,
    Policy,
    Query,
    Role,
    Sampling,
    Scope,
)
from services.cache.keys import canonical, is_sampled, query_keys, validate
from services.cache.policy import decide
from tests.cache.conftest import chat

T0 = 1.0  # the workers' default temperature in these tests


def keys(q: Query):
    validate(q)
    return query_keys(q, T0)


BASE = chat("What is the capital of France?", history=(
    Message(Role.USER, "Hi"), Message(Role.ASSISTANT, "Hello!")))


def with_scope(**kw) -> Query:
    return dataclasses.replace(BASE, scope=dataclasses.replace(BASE.scope, **kw))


def with_sampling(**kw) -> Query:
    return dataclasses.replace(BASE, sampling=dataclasses.replace(BASE.sampling, **kw))


def test_same_request_same_key():
    rebuilt = chat("What is the capital of France?", history=(
        Message(Role.USER, "Hi"), Message(Role.ASSISTANT, "Hello!")))
    assert keys(rebuilt) == keys(BASE)


@pytest.mark.parametrize("variant", [
    with_scope(tenant="globex"),
    with_scope(permission_scope="admins"),
    with_scope(model_id="other-model"),
    with_scope(model_version="v2"),
    with_scope(prompt_version="faq@2"),
    chat("What is the capital of France?", system="You are terse."),
    chat("What is the capital of France?"),  # earlier turns dropped
    chat("What is the capital of France?", history=(Message(Role.USER, "Hi"),
                                                    Message(Role.ASSISTANT, "Hey!"))),
    chat("What is the capital of France? "),  # text kept byte for byte
    dataclasses.replace(BASE, add_generation_prompt=False),
    dataclasses.replace(BASE, prompt="What is the capital of France?", messages=None),
    with_sampling(repetition_penalty=1.2),
    with_sampling(presence_penalty=0.5),
    with_sampling(frequency_penalty=0.5),
    with_sampling(stop=("\n",)),
    with_sampling(stop_token_ids=(7,)),
    with_sampling(ignore_eos=True),
    with_sampling(temperature=0.7),
], ids=lambda q: "variant")
def test_any_deciding_field_changes_the_exact_key(variant):
    assert keys(variant).stop_id != keys(BASE).stop_id
    assert keys(variant).length_id != keys(BASE).length_id


@pytest.mark.parametrize("variant", [
    with_sampling(top_p=0.9), with_sampling(top_k=40), with_sampling(min_p=0.1),
    with_sampling(seed=1), with_sampling(top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                                         presence_penalty=0.0, frequency_penalty=0.0),
    with_sampling(stop=()), dataclasses.replace(BASE, add_generation_prompt=True),
    dataclasses.replace(BASE, max_tokens=999),  # STOP entries are keyed without max_tokens
], ids=lambda q: "variant")
def test_greedy_ignores_what_greedy_decoding_ignores(variant):
    assert keys(variant).stop_id == keys(BASE).stop_id


def test_sampled_keys_see_every_sampling_knob():
    sampled = Sampling(temperature=0.8)
    base = dataclasses.replace(BASE, sampling=sampled)
    for change in (dict(top_p=0.9), dict(top_k=40), dict(min_p=0.1), dict(seed=7),
                   dict(temperature=0.9)):
        other = dataclasses.replace(base, sampling=dataclasses.replace(sampled, **change))
        assert keys(other).stop_id != keys(base).stop_id, change
    # Unset temperature means the server default (T0): equal to asking for it explicitly.
    unset = dataclasses.replace(base, sampling=Sampling())
    explicit = dataclasses.replace(base, sampling=Sampling(temperature=T0))
    assert keys(unset).stop_id == keys(explicit).stop_id


def test_stop_strings_are_a_set_and_top_k_1_is_greedy():
    a = with_sampling(stop=("a", "b", "a"))
    b = with_sampling(stop=("b", "a"))
    assert keys(a) == keys(b)
    assert not is_sampled(Sampling(temperature=0.9, top_k=1), T0)
    assert is_sampled(Sampling(), T0)
    assert not is_sampled(Sampling(), 0.0)


def test_length_key_depends_on_max_tokens():
    assert keys(dataclasses.replace(BASE, max_tokens=10)).length_id != keys(BASE).length_id


def test_semantic_group_is_scope_and_context_without_the_last_turn():
    k = keys(BASE)
    para = chat("Which city is the capital of France?", history=BASE.messages[1:3])
    assert keys(para).group == k.group and keys(para).semantic_text.startswith("Which")
    assert keys(with_scope(tenant="globex")).group != k.group
    assert keys(chat("What is the capital of France?")).group != k.group  # history differs
    assert keys(chat("x", system="You are terse.")).group != keys(chat("x")).group
    trailing_assistant = dataclasses.replace(
        BASE, messages=(*BASE.messages, Message(Role.ASSISTANT, "The capital")))
    assert keys(trailing_assistant).group is None
    raw = dataclasses.replace(BASE, prompt="Once upon a time", messages=None)
    assert keys(raw).semantic_text == "Once upon a time"


def test_canonical_form_is_json_with_scope_input_and_sampling():
    doc = canonical(BASE, T0)
    assert doc["scope"] == ["acme", "", "smollm2", "v1", ""]
    assert doc["input"]["chat"][-1] == ["USER", "", "What is the capital of France?"]
    assert doc["sampling"]["greedy"] is True


@pytest.mark.parametrize("bad, field", [
    (Query(scope=Scope(), max_tokens=5), "query.input"),
    (Query(scope=Scope(), messages=(), max_tokens=5), "query.chat.messages"),
    (Query(scope=Scope(), messages=(Message(Role.UNSPECIFIED, "x"),), max_tokens=5),
     "query.chat.messages[0].role"),
    (Query(scope=Scope(), prompt="x", max_tokens=0), "query.max_tokens"),
    (Query(scope=Scope(), prompt="x", max_tokens=5, sampling=Sampling(top_p=float("nan"))),
     "query.sampling.top_p"),
])
def test_validate_names_the_bad_field(bad, field):
    with pytest.raises(InvalidArgument) as e:
        validate(bad)
    assert e.value.field == field


CFG = CacheConfig(default_temperature=T0)


@pytest.mark.parametrize("mode, lookup, store", [
    (CacheMode.UNSPECIFIED, True, True), (CacheMode.ENABLED, True, True),
    (CacheMode.DISABLED, False, False), (CacheMode.LOOKUP_ONLY, True, False),
    (CacheMode.STORE_ONLY, False, True),
])
def test_policy_modes(mode, lookup, store):
    d = decide(BASE, Policy(mode=mode), CFG)
    assert (d.lookup, d.store) == (lookup, store)
    assert (d.lookup_reason == "") == lookup and (d.store_reason == "") == store


def test_policy_sampled_logprobs_semantic_and_threshold():
    sampled = with_sampling(temperature=0.7)
    d = decide(sampled, Policy(), CFG)
    assert not d.lookup and not d.store and "allow_sampled" in d.lookup_reason
    assert decide(sampled, Policy(allow_sampled=True), CFG).lookup
    unset = dataclasses.replace(BASE, sampling=Sampling())  # default temperature 1.0: sampled
    assert not decide(unset, Policy(), CFG).lookup
    d = decide(with_sampling(logprobs=0), Policy(allow_sampled=True), CFG)
    assert not d.lookup and not d.store and d.lookup_reason == "logprobs requested"
    assert decide(BASE, Policy(), CFG).semantic
    assert not decide(BASE, Policy(allow_semantic=False), CFG).semantic
    off = dataclasses.replace(CFG, semantic_enabled=False)
    assert not decide(BASE, Policy(allow_semantic=True), off).semantic
    assert decide(BASE, Policy(min_similarity=0.5), CFG).threshold == CFG.similarity_threshold
    assert decide(BASE, Policy(min_similarity=0.97), CFG).threshold == pytest.approx(0.97)
    with pytest.raises(InvalidArgument, match="policy.min_similarity"):
        decide(BASE, Policy(min_similarity=1.5), CFG)


@pytest.mark.parametrize("kw, needle", [
    (dict(ttl_s=0), "ttl_s"), (dict(similarity_threshold=1.2), "similarity_threshold"),
    (dict(redis_url="http://x"), "redis_url"), (dict(port=70000), "port"),
    (dict(max_entries_per_tenant=0), "max_entries_per_tenant"),
    (dict(embed_dtype="float16"), "embed_dtype"),
    (dict(default_mode=CacheMode.UNSPECIFIED), "default_mode"),
])
def test_config_validation_names_the_bad_value(kw, needle):
    with pytest.raises(ValueError, match=needle):
        CacheConfig(**kw)
