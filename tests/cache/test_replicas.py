"""Several replicas on one Redis: live sync, rebuild at start, reconciliation of missed events."""

from __future__ import annotations

import time

from services.cache.domain import InvalidateKind, InvalidateTarget, Policy, ResultKind
from tests.cache.conftest import answer, chat, wait_for

DEFAULT = Policy()
Q = chat("How many legs does a spider have?")
PARA = chat("How many legs do spiders have?")


def test_store_on_one_replica_is_found_by_the_other_within_a_second(config, make_replica):
    a, b = make_replica(config), make_replica(config)
    t0 = time.monotonic()
    stored = a.cache.store_answer(Q, answer("Eight."), DEFAULT)
    assert wait_for(lambda: stored.entry_id in b.index, timeout=1.0)
    hit = b.cache.lookup(PARA, DEFAULT)
    assert hit.kind == ResultKind.SEMANTIC and hit.answer.text == "Eight."
    assert time.monotonic() - t0 < 1.0
    assert b.cache.lookup(Q, DEFAULT).kind == ResultKind.EXACT  # exact reads Redis directly

    # An invalidation on B reaches A's index too.
    b.cache.invalidate(InvalidateTarget(InvalidateKind.ENTRY_ID, stored.entry_id))
    assert wait_for(lambda: stored.entry_id not in a.index, timeout=1.0)
    assert a.cache.lookup(PARA, DEFAULT).kind == ResultKind.MISS


def test_lru_eviction_on_one_replica_reaches_the_other(config, make_replica):
    a = make_replica(config, max_entries_per_tenant=1)
    b = make_replica(config, max_entries_per_tenant=1)
    first = a.cache.store_answer(Q, answer(), DEFAULT).entry_id
    assert wait_for(lambda: first in b.index)
    b.cache.store_answer(chat("Why is the sky blue?"), answer(), DEFAULT)
    assert wait_for(lambda: first not in a.index and len(a.index) == 1)


def test_index_is_rebuilt_from_redis_after_a_restart(config, make_replica):
    first = make_replica(config)
    texts = ["What is the capital of France?", "How many legs does a spider have?",
             "Who wrote Pride and Prejudice?"]
    for t in texts:
        first.cache.store_answer(chat(t), answer(t), DEFAULT)
    first.cache.store_answer(chat("other tenant", tenant="globex"), answer(), DEFAULT)
    first.stop()

    restarted = make_replica(config)  # same Redis, fresh process state
    assert len(restarted.index) == 4  # rebuilt synchronously before serving
    hit = restarted.cache.lookup(chat("Which city is the capital of France?"), DEFAULT)
    assert hit.kind == ResultKind.SEMANTIC and hit.answer.text == texts[0]


def test_reconcile_repairs_missed_events(config, make_replica):
    a = make_replica(config)
    a.sync.stop()  # no subscriber: events are lost from here on
    b = make_replica(config)
    eid = b.cache.store_answer(Q, answer(), DEFAULT).entry_id
    time.sleep(0.1)
    assert eid not in a.index
    a.index.add("ghost", "some-group", b.cache.embedder.embed(["ghost"])[0])  # removed in Redis
    assert a.sync.reconcile()
    assert a.index.ids() == {eid}


def test_periodic_check_notices_a_lost_event(config, make_replica):
    a = make_replica(config, reconcile_interval_s=0.1)
    eid = a.cache.store_answer(Q, answer(), DEFAULT).entry_id
    a.index.remove(eid)  # as if the add event had been lost
    assert wait_for(lambda: eid in a.index, timeout=2.0)
    assert a.cache.lookup(PARA, DEFAULT).kind == ResultKind.SEMANTIC
