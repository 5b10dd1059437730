"""ResponseCache on a real Redis: exact keys, policy, tenant isolation, TTL, LRU, invalidation."""

from __future__ import annotations

import dataclasses
import time

import pytest

from services.cache.domain import (
    CacheMode,
    FinishReason,
    InvalidArgument,
    InvalidateKind,
    InvalidateTarget,
    Message,
    Policy,
    ResultKind,
    Role,
    Sampling,
)
from tests.cache.conftest import answer, chat, wait_for

DEFAULT = Policy()
EXACT_ONLY = Policy(allow_semantic=False)
Q = chat("What is the capital of France?",
         history=(Message(Role.USER, "Hi"), Message(Role.ASSISTANT, "Hello!")))


def with_last(q, text: str):
    """`q` with its last user turn replaced."""
    return dataclasses.replace(q, messages=(*q.messages[:-1], Message(Role.USER, text)))


PARA = with_last(Q, "Which city is the capital of France?")


@pytest.fixture
def cache(config, make_replica):
    return make_replica(config).cache


def test_exact_hit_on_the_same_request(cache):
    assert cache.lookup(Q, DEFAULT).kind == ResultKind.MISS
    stored = cache.store_answer(Q, answer("Paris."), DEFAULT)
    assert stored.stored and stored.entry_id
    hit = cache.lookup(Q, DEFAULT)
    assert (hit.kind, hit.similarity, hit.entry_id) == (ResultKind.EXACT, 1.0, stored.entry_id)
    assert hit.answer.text == "Paris." and hit.answer.token_ids == (1, 2, 3)
    assert hit.answer.usage.completion_tokens == 3 and hit.answer.tier == 1
    assert abs(hit.answer.created_unix_ms - time.time() * 1000) < 60_000


def _scope(**kw):
    return dataclasses.replace(Q, scope=dataclasses.replace(Q.scope, **kw))


def _sampling(**kw):
    return dataclasses.replace(Q, sampling=dataclasses.replace(Q.sampling, **kw))


@pytest.mark.parametrize("variant", [
    _scope(tenant="globex"), _scope(permission_scope="admins"), _scope(model_id="m2"),
    _scope(model_version="v2"), _scope(prompt_version="faq@2"),
    dataclasses.replace(Q, messages=(Message(Role.SYSTEM, "Be terse."), *Q.messages[1:])),
    dataclasses.replace(Q, messages=(Q.messages[0], Q.messages[-1])),
    dataclasses.replace(Q, add_generation_prompt=False),
    _sampling(repetition_penalty=1.3), _sampling(stop=("\n",)), _sampling(ignore_eos=True),
    _sampling(presence_penalty=1.0), _sampling(stop_token_ids=(5,)),
], ids=lambda q: "v")
def test_miss_when_a_scope_field_or_output_parameter_differs(cache, variant):
    cache.store_answer(Q, answer(), DEFAULT)
    for q in (variant, with_last(variant, PARA.messages[-1].content)):
        out = cache.lookup(q, DEFAULT)
        assert out.kind == ResultKind.MISS, out  # neither exact nor semantic


def test_max_tokens_rules_for_stop_and_length_entries(cache):
    cache.store_answer(Q, answer(completion_tokens=3), DEFAULT)
    for mt, kind in ((3, ResultKind.EXACT), (1000, ResultKind.EXACT), (2, ResultKind.MISS)):
        assert cache.lookup(dataclasses.replace(Q, max_tokens=mt), EXACT_ONLY).kind == kind, mt
    q2 = chat("Write a long story", max_tokens=16)
    cache.store_answer(q2, answer("Once", 16, FinishReason.LENGTH), DEFAULT)
    assert cache.lookup(q2, DEFAULT).kind == ResultKind.EXACT
    out = cache.lookup(dataclasses.replace(q2, max_tokens=32), DEFAULT)
    assert out.kind == ResultKind.MISS and "max_tokens 16" in out.reason  # semantic saw it


def test_policy_modes_sampling_and_finish_reasons(cache):
    out = cache.store_answer(Q, answer(), Policy(mode=CacheMode.LOOKUP_ONLY))
    assert not out.stored and out.reason == "policy: lookup_only"
    assert cache.store_answer(Q, answer("v1"), Policy(mode=CacheMode.STORE_ONLY)).stored
    assert cache.lookup(Q, Policy(mode=CacheMode.STORE_ONLY)).kind == ResultKind.BYPASSED
    assert cache.lookup(Q, Policy(mode=CacheMode.DISABLED)).kind == ResultKind.BYPASSED
    cache.store_answer(Q, answer("v2"), Policy(mode=CacheMode.STORE_ONLY))  # a refresh
    assert cache.lookup(Q, Policy(mode=CacheMode.LOOKUP_ONLY)).answer.text == "v2"
    aborted = cache.store_answer(chat("x"), answer(finish=FinishReason.ABORT), DEFAULT)
    assert not aborted.stored and aborted.reason == "finish_reason ABORT"

    sampled = chat("Tell me a joke", temperature=0.8)
    out = cache.store_answer(sampled, answer(), DEFAULT)
    assert not out.stored and "allow_sampled" in out.reason
    assert cache.lookup(sampled, DEFAULT).kind == ResultKind.BYPASSED
    opt_in = Policy(allow_sampled=True)
    assert cache.store_answer(sampled, answer("A joke"), opt_in).stored
    assert cache.lookup(sampled, opt_in).kind == ResultKind.EXACT
    logprobs = dataclasses.replace(Q, sampling=Sampling(temperature=0.0, logprobs=1))
    assert cache.lookup(logprobs, DEFAULT).kind == ResultKind.BYPASSED
    assert not cache.store_answer(logprobs, answer(), DEFAULT).stored
    with pytest.raises(InvalidArgument):
        cache.lookup(dataclasses.replace(Q, max_tokens=0), DEFAULT)
    s = cache.stats("acme")
    assert (s.stores, s.dropped_stores) == (3, 4)


def test_semantic_hit_reports_similarity_and_respects_policy(cache):
    cache.store_answer(Q, answer("Paris."), DEFAULT)
    hit = cache.lookup(PARA, DEFAULT)
    assert hit.kind == ResultKind.SEMANTIC and hit.answer.text == "Paris."
    assert 0.85 <= hit.similarity < 1.0 and hit.reason == ""
    assert cache.lookup(PARA, EXACT_ONLY).kind == ResultKind.MISS
    strict = cache.lookup(PARA, Policy(min_similarity=0.99))
    assert strict.kind == ResultKind.MISS and strict.similarity == pytest.approx(hit.similarity)
    miss = cache.lookup(with_last(Q, "What is the capital of Germany?"), DEFAULT)
    assert miss.kind == ResultKind.MISS and 0 < miss.similarity < 0.85, miss


@pytest.mark.parametrize("first", ["acme", "globex"])
def test_tenant_isolation_exact_and_semantic_in_any_store_order(cache, first):
    second = "globex" if first == "acme" else "acme"
    for tenant in (first, second):
        cache.store_answer(_scope(tenant=tenant), answer(f"answer for {tenant}"), DEFAULT)
    for tenant in ("acme", "globex"):
        for q in (_scope(tenant=tenant), dataclasses.replace(PARA, scope=_scope(
                tenant=tenant).scope)):
            out = cache.lookup(q, DEFAULT)
            assert out.kind in (ResultKind.EXACT, ResultKind.SEMANTIC)
            assert out.answer.text == f"answer for {tenant}"
    for q in (_scope(tenant="initech"), dataclasses.replace(PARA, scope=_scope(
            tenant="initech").scope)):
        assert cache.lookup(q, DEFAULT).kind == ResultKind.MISS


def test_tenant_b_never_sees_tenant_a_even_when_b_has_nothing(cache):
    cache.store_answer(Q, answer("secret of acme"), DEFAULT)
    for text in ("What is the capital of France?", "Which city is the capital of France?",
                 "capital of France?"):
        out = cache.lookup(chat(text, tenant="globex"), DEFAULT)
        assert out.kind == ResultKind.MISS and out.answer is None


def test_ttl_expiry_and_hits_do_not_extend_it(config, make_replica):
    cache = make_replica(config, ttl_s=0.4).cache
    cache.store_answer(Q, answer(), DEFAULT)
    time.sleep(0.2)
    assert cache.lookup(Q, DEFAULT).kind == ResultKind.EXACT  # a hit, not a refresh
    time.sleep(0.3)
    assert cache.lookup(Q, DEFAULT).kind == ResultKind.MISS
    assert cache.lookup(PARA, DEFAULT).kind == ResultKind.MISS
    assert wait_for(lambda: len(cache.index) == 0 and cache.stats("").entries == 0)
    assert cache.stats("").evictions == 1


def test_ttl_refreshed_on_hit_when_configured(config, make_replica):
    cache = make_replica(config, ttl_s=0.4, refresh_ttl_on_hit=True).cache
    cache.store_answer(Q, answer(), DEFAULT)
    for _ in range(4):  # 0.8 s in all, twice the TTL
        time.sleep(0.2)
        assert cache.lookup(Q, DEFAULT).kind == ResultKind.EXACT
    time.sleep(0.6)
    assert cache.lookup(Q, DEFAULT).kind == ResultKind.MISS


def test_lru_bound_per_tenant_evicts_least_recently_used(config, make_replica):
    cache = make_replica(config, max_entries_per_tenant=3).cache
    qs = [chat(f"question number {i}") for i in range(5)]
    for q in qs[:3]:
        assert cache.store_answer(q, answer(), DEFAULT).stored
    other = chat("question number 0", tenant="globex")
    cache.store_answer(other, answer(), DEFAULT)
    assert cache.lookup(qs[0], EXACT_ONLY).kind == ResultKind.EXACT  # q0 now most recent
    cache.store_answer(qs[3], answer(), DEFAULT)  # evicts q1
    cache.store_answer(qs[4], answer(), DEFAULT)  # evicts q2
    kinds = [cache.lookup(q, EXACT_ONLY).kind for q in qs]
    assert kinds == [ResultKind.EXACT, ResultKind.MISS, ResultKind.MISS, ResultKind.EXACT,
                     ResultKind.EXACT]
    assert cache.lookup(other, EXACT_ONLY).kind == ResultKind.EXACT  # other tenant untouched
    assert cache.stats("acme").entries == 3 and cache.stats("").entries == 4
    assert cache.stats("").evictions == 2 and len(cache.index) == 4


def _fill(cache):
    """Entries across tenants, model versions and prompt versions; returns their queries."""
    qs = {}
    for tenant in ("acme", "globex"):
        for mv in ("v1", "v2"):
            for pv in ("p1", "p2"):
                q = chat("What is the capital of France?", tenant=tenant, model_version=mv,
                         prompt_version=pv)
                assert cache.store_answer(q, answer(), DEFAULT).stored
                qs[tenant, mv, pv] = q
    return qs


def _alive(cache, qs):
    return {k for k, q in qs.items() if cache.lookup(q, DEFAULT).kind == ResultKind.EXACT}


def test_invalidate_by_tenant_model_version_prompt_version(cache):
    qs = _fill(cache)
    inv = cache.invalidate
    assert inv(InvalidateTarget(InvalidateKind.MODEL_VERSION, "v1", tenant_filter="acme")) == 2
    assert _alive(cache, qs) == set(qs) - {("acme", "v1", "p1"), ("acme", "v1", "p2")}
    assert inv(InvalidateTarget(InvalidateKind.PROMPT_VERSION, "p2")) == 3
    assert _alive(cache, qs) == {("acme", "v2", "p1"), ("globex", "v1", "p1"),
                                 ("globex", "v2", "p1")}
    assert inv(InvalidateTarget(InvalidateKind.MODEL_VERSION, "v2")) == 2
    assert inv(InvalidateTarget(InvalidateKind.TENANT, "globex")) == 1
    assert _alive(cache, qs) == set() and cache.stats("").entries == 0
    assert len(cache.index) == 0
    assert inv(InvalidateTarget(InvalidateKind.TENANT, "globex")) == 0


def test_invalidate_one_wrong_answer_by_entry_id(cache):
    cache.store_answer(Q, answer("Lyon."), DEFAULT)  # wrong
    keep = chat("How many legs does a spider have?")
    cache.store_answer(keep, answer("Eight."), DEFAULT)
    hit = cache.lookup(PARA, DEFAULT)
    assert hit.kind == ResultKind.SEMANTIC and hit.answer.text == "Lyon."
    assert cache.invalidate(InvalidateTarget(InvalidateKind.ENTRY_ID, hit.entry_id)) == 1
    assert cache.lookup(PARA, DEFAULT).kind == ResultKind.MISS
    assert cache.lookup(Q, DEFAULT).kind == ResultKind.MISS
    assert cache.lookup(keep, DEFAULT).kind == ResultKind.EXACT
    assert cache.invalidate(InvalidateTarget(InvalidateKind.ENTRY_ID, hit.entry_id)) == 0
    with pytest.raises(InvalidArgument, match="tenant_filter"):
        cache.invalidate(InvalidateTarget(InvalidateKind.TENANT, "acme", tenant_filter="acme"))


def test_stats_per_tenant_and_total(cache):
    cache.store_answer(Q, answer(), DEFAULT)
    cache.store_answer(chat("hello", tenant="globex"), answer(), DEFAULT)
    cache.lookup(Q, DEFAULT)
    cache.lookup(PARA, DEFAULT)
    cache.lookup(chat("unrelated question about bread"), DEFAULT)
    cache.lookup(chat("hello", tenant="globex"), Policy(mode=CacheMode.DISABLED))
    a, total = cache.stats("acme"), cache.stats("")
    assert (a.entries, a.exact_hits, a.semantic_hits, a.misses, a.stores) == (1, 1, 1, 1, 1)
    assert (total.entries, total.stores, total.misses) == (2, 2, 1)  # BYPASSED is no miss
    assert total.redis_available and total.redis_errors == 0
