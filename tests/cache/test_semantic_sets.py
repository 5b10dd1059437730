"""Semantic hits on the data sets: paraphrases hit, near misses never do.

Each pair is stored and looked up through ResponseCache in a scope of its own (one prompt
version per pair), with the default threshold and guard: the stored text is stored, the query
text looked up. Data: tests/cache/data/paraphrases.tsv and near_misses.tsv.
"""

from __future__ import annotations

from collections import Counter

import pytest

from services.cache.config import DEFAULT_SIMILARITY_THRESHOLD
from services.cache.domain import Policy, ResultKind
from tests.cache.conftest import FUNCTIONAL_TIMEOUT_S, answer, chat, read_pairs

PARAPHRASES = read_pairs("paraphrases.tsv")
NEAR_MISSES = read_pairs("near_misses.tsv")


def test_data_sets_are_large_enough():
    assert len(PARAPHRASES) >= 100
    assert len(NEAR_MISSES) >= 150
    cats = Counter(c for c, _, _ in NEAR_MISSES)
    assert all(cats[c] >= 50 for c in ("negation", "number", "entity")), cats


@pytest.fixture(scope="module")
def cache(redis_server, embedder, tmp_path_factory):
    from services.cache.config import CacheConfig
    from services.cache.server import CacheReplica

    texts = sorted({t for rows in (PARAPHRASES, NEAR_MISSES) for _, a, b in rows for t in (a, b)})
    for i in range(0, len(texts), 64):  # warm the embedder's LRU in batches (faster)
        embedder.embed(texts[i : i + 64])
    replica = CacheReplica(CacheConfig(redis_url=redis_server.url, key_prefix="sets:",
                                       redis_timeout_s=FUNCTIONAL_TIMEOUT_S), embedder)
    replica.start()
    yield replica.cache
    replica.stop()


def run_pairs(cache, rows, name):
    """Stores each pair's first text, looks up its second; returns (outcome, row) pairs."""
    results = []
    for i, row in enumerate(rows):
        _, stored, query = row
        scope = dict(prompt_version=f"{name}-{i}")
        assert cache.store_answer(chat(stored, **scope), answer(stored), Policy()).stored
        results.append((cache.lookup(chat(query, **scope), Policy()), row))
    return results


def test_paraphrases_hit(cache):
    results = run_pairs(cache, PARAPHRASES, "para")
    hits = [o for o, _ in results if o.kind == ResultKind.SEMANTIC]
    rate = len(hits) / len(results)
    assert all(o.similarity >= DEFAULT_SIMILARITY_THRESHOLD for o in hits)
    assert all(o.answer.text == row[1] for o, row in results if o.kind == ResultKind.SEMANTIC)
    missed = [f"{o.similarity:.3f} {row[1]!r} / {row[2]!r}: {o.reason}"
              for o, row in results if o.kind != ResultKind.SEMANTIC]
    print(f"\ntrue-hit rate {rate:.1%} ({len(hits)}/{len(results)})")
    assert rate >= 0.85, "\n".join(missed)


def test_near_misses_never_hit(cache):
    results = run_pairs(cache, NEAR_MISSES, "near")
    false_hits = [f"{o.similarity:.3f} {row[0]}: {row[1]!r} / {row[2]!r}"
                  for o, row in results if o.kind != ResultKind.MISS]
    above = Counter(row[0] for o, row in results if o.similarity >= DEFAULT_SIMILARITY_THRESHOLD)
    print(f"\nfalse hits {len(false_hits)}/{len(results)}; above threshold, stopped by the "
          f"guard: {dict(above)}")
    assert not false_hits, "\n".join(false_hits)
    assert sum(above.values()) > 50  # the guard, not the threshold, did most of the work
