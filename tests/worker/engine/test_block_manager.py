"""BlockManager: exact block ids, ref counts, eviction order and prefix-cache behaviour."""

from __future__ import annotations

import pytest

from services.worker.engine import BlockManager
from services.worker.engine import block_manager as block_manager_module
from services.worker.engine.block_manager import hash_block_tokens


def _admit(bm, request, num_new_tokens=None):
    """What the scheduler does on admission: prefix lookup, allocate, set computed tokens."""
    computed, num_hit = bm.get_computed_blocks(request)
    if num_new_tokens is None:
        num_new_tokens = request.num_tokens - num_hit
    new_ids = bm.allocate_slots(request, num_new_tokens, computed)
    assert new_ids is not None
    request.num_computed_tokens = num_hit
    return new_ids


def _compute(request, num_tokens):
    """What update_from_output does: the step's tokens now have KV."""
    request.record_computed(num_tokens)


def _ref_cnts(bm):
    return [block.ref_cnt for block in bm.blocks]


def test_allocation_takes_block_ids_in_order(make_request):
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", 10)
    b = make_request("b", 5)

    assert bm.allocate_slots(a, 10) == [0, 1, 2]
    assert bm.allocate_slots(b, 5) == [3, 4]

    assert a.block_ids == [0, 1, 2]
    assert b.block_ids == [3, 4]
    assert bm.num_free_blocks == 3
    assert bm.usage == pytest.approx(5 / 8)
    assert _ref_cnts(bm) == [1, 1, 1, 1, 1, 0, 0, 0]
    bm.check_integrity([a, b])


def test_decode_growth_adds_a_block_only_at_a_boundary(make_request):
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", 7)
    assert bm.allocate_slots(a, 7) == [0, 1]
    _compute(a, 7)
    a.append_output_token(50)
    assert bm.allocate_slots(a, 1) == []  # token 7 fills block 1
    _compute(a, 1)
    a.append_output_token(51)
    assert bm.allocate_slots(a, 1) == [2]  # token 8 opens block 2
    assert a.block_ids == [0, 1, 2]
    bm.check_integrity([a])


def test_eviction_order_is_lru_with_each_request_freed_tail_first(make_request):
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", 10)
    b = make_request("b", 5)
    bm.allocate_slots(a, 10)
    bm.allocate_slots(b, 5)

    bm.free(a)
    bm.free(b)
    assert a.block_ids == [] and b.block_ids == []
    assert bm.num_free_blocks == 8
    bm.check_integrity([])

    # Never-used blocks first, then a's blocks tail first, then b's tail first.
    c = make_request("c", 30)
    assert bm.allocate_slots(c, 30) == [5, 6, 7, 2, 1, 0, 4, 3]
    # Reusing a's published blocks evicted their hashes: a's prompt no longer hits.
    assert bm.get_computed_blocks(make_request("a", 10)) == ([], 0)
    assert bm.blocks[0].token_ids == c.prompt_token_ids[20:24]  # c's sixth block
    bm.check_integrity([c])


def test_prefix_hit_shares_full_blocks_never_the_partial_one(make_request):
    bm = BlockManager(num_blocks=10, block_size=16)
    a = make_request("a", list(range(40)))
    b = make_request("b", list(range(32)) + list(range(100, 108)))
    assert _admit(bm, a) == [0, 1, 2]

    assert bm.get_computed_blocks(b) == ([0, 1], 32)
    assert _admit(bm, b) == [3]

    assert b.block_ids == [0, 1, 3]
    assert b.num_computed_tokens == 32
    assert _ref_cnts(bm)[:4] == [2, 2, 1, 1]
    assert bm.num_free_blocks == 6
    assert (bm.stats.num_queries, bm.stats.num_hits, bm.stats.num_admissions) == (80, 32, 2)
    bm.check_integrity([a, b])

    bm.free(a)
    assert _ref_cnts(bm)[:4] == [1, 1, 0, 1]
    bm.check_integrity([b])


def test_hit_after_the_first_request_is_freed_comes_back_from_the_free_queue(make_request):
    bm = BlockManager(num_blocks=10, block_size=16)
    a = make_request("a", list(range(40)))
    _admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 10
    assert bm.num_cached_blocks == 2  # freed blocks stay findable

    b = make_request("b", list(range(32)) + [7] * 8)
    assert _admit(bm, b) == [3]  # touched 0 and 1 out of the free queue; fresh block from head
    assert b.block_ids == [0, 1, 3]
    assert _ref_cnts(bm)[:4] == [1, 1, 0, 1]
    assert bm.num_free_blocks == 7
    bm.check_integrity([b])


def test_hash_collision_never_serves_wrong_blocks(make_request, monkeypatch):
    monkeypatch.setattr(block_manager_module, "hash_block_tokens", lambda parent, tokens: 0)
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert _admit(bm, a) == [0, 1, 2]
    assert bm.num_cached_blocks == 1  # block 1 collides with block 0 and stays unpublished

    other_first_block = make_request("b", [100, 101, 102, 103, 5, 6, 7, 8, 9])
    assert bm.get_computed_blocks(other_first_block) == ([], 0)

    # Same tokens as block 0 but at position 1: the parent check rejects it.
    repeated = make_request("c", [1, 2, 3, 4, 1, 2, 3, 4, 9])
    assert bm.get_computed_blocks(repeated) == ([0], 4)
    bm.check_integrity([a])


def test_block_hash_is_stable_and_chained():
    first = hash_block_tokens(None, (1, 2, 3, 4))
    assert first == 2696991480322780430  # sha256-based: identical in every process
    assert hash_block_tokens(first, (5, 6, 7, 8)) == 15827582618833516453
    assert hash_block_tokens(None, (5, 6, 7, 8)) != hash_block_tokens(first, (5, 6, 7, 8))


def test_cached_block_is_evicted_from_the_map_when_reused(make_request):
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", 9)
    _admit(bm, a)
    bm.free(a)  # free queue: 3, 2, 1, 0
    assert bm.num_cached_blocks == 2

    x = make_request("x", 8)
    assert bm.allocate_slots(x, 8) == [3, 2]
    y = make_request("y", 3)
    assert bm.allocate_slots(y, 3) == [1]  # a's second block is reused

    assert bm.blocks[1].block_hash is None
    assert bm.num_cached_blocks == 3  # a's block 0 and x's two full blocks
    again = make_request("a", 9)
    assert bm.get_computed_blocks(again) == ([0], 4)
    bm.check_integrity([x, y])


def test_last_partial_block_is_never_shared_and_published_only_when_full(make_request):
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10))
    a = make_request("a", prompt)
    b = make_request("b", prompt)
    assert _admit(bm, a) == [0, 1, 2]
    _compute(a, 10)
    assert _admit(bm, b) == [3]
    _compute(b, 2)
    assert b.block_ids == [0, 1, 3]
    assert _ref_cnts(bm)[:4] == [2, 2, 1, 1]
    assert bm.blocks[2].block_hash is None and bm.blocks[3].block_hash is None

    for request in (a, b):  # both decode the same two tokens
        for token in (50, 51):
            request.append_output_token(token)
            bm.allocate_slots(request, 1)
            _compute(request, 1)

    assert bm.blocks[2].token_ids == (8, 9, 50, 51)  # a's block filled: published
    assert bm.blocks[3].block_hash is None  # b's identical block: one block per hash
    assert _ref_cnts(bm)[:4] == [2, 2, 1, 1]
    bm.check_integrity([a, b])


def test_whole_prompt_hit_is_capped_so_one_token_is_recomputed(make_request):
    bm = BlockManager(num_blocks=8, block_size=16)
    a = make_request("a", list(range(32)))
    _admit(bm, a)
    assert bm.num_cached_blocks == 2

    same = make_request("same", list(range(32)))
    assert bm.get_computed_blocks(same) == ([0], 16)
    longer = make_request("longer", list(range(33)))
    assert bm.get_computed_blocks(longer) == ([0, 1], 32)


def _snapshot(bm, *requests):
    return (
        list(bm._free),
        _ref_cnts(bm),
        [block.block_hash for block in bm.blocks],
        [list(r.block_ids) for r in requests],
        (bm.stats.num_queries, bm.stats.num_hits),
    )


def test_allocate_returns_none_when_out_of_blocks_and_changes_nothing(make_request):
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(12)))
    _admit(bm, a)
    b = make_request("b", list(range(8)) + list(range(100, 109)))
    computed, _ = bm.get_computed_blocks(b)
    assert computed == [0, 1]

    before = _snapshot(bm, a, b)
    assert not bm.can_allocate(b, 9, computed)
    assert bm.allocate_slots(b, 9, computed) is None
    assert _snapshot(bm, a, b) == before

    # Cached blocks sitting in the free queue count against the free blocks they occupy.
    bm.free(a)
    assert not bm.can_allocate(b, 9, computed)  # 2 touched + 3 fresh > 4
    before = _snapshot(bm, b)
    assert bm.allocate_slots(b, 9, computed) is None
    assert _snapshot(bm, b) == before
    bm.check_integrity([])


def test_touching_cached_free_blocks_then_allocating_from_the_head(make_request):
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", list(range(12)))
    _admit(bm, a)
    bm.free(a)  # free queue: 3, 2, 1, 0
    b = make_request("b", list(range(8)) + list(range(100, 108)))
    assert _admit(bm, b) == [3, 2]
    assert b.block_ids == [0, 1, 3, 2]
    assert bm.num_free_blocks == 0
    bm.check_integrity([b])


def test_reset_prefix_cache_drops_every_hash(make_request):
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", 9)
    _admit(bm, a)
    bm.free(a)
    assert bm.reset_prefix_cache() == 2
    assert bm.num_cached_blocks == 0
    assert all(block.block_hash is None for block in bm.blocks)
    assert bm.get_computed_blocks(make_request("a", 9)) == ([], 0)
    bm.check_integrity([])


def test_prefix_caching_disabled_publishes_and_hits_nothing(make_request):
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", 9)
    _admit(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.get_computed_blocks(make_request("a", 9)) == ([], 0)
    assert bm.stats.num_queries == 0
    bm.check_integrity([a])


def test_check_integrity_names_the_violation(make_request):
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", 5)
    bm.allocate_slots(a, 5)
    with pytest.raises(AssertionError, match="block 0 ref_cnt=1 but 0 live requests hold it"):
        bm.check_integrity([])
    bm._free[0] = None
    with pytest.raises(AssertionError, match="block 0 ref_cnt=1 but in_free_queue=True"):
        bm.check_integrity([a])
    del bm._free[0]
    bm.blocks[1].block_hash = bm.blocks[0].block_hash
    with pytest.raises(AssertionError, match="block 1 .* published under a hash that does not"):
        bm.check_integrity([a])


def test_allocation_beyond_known_tokens_is_rejected(make_request):
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_request("a", 5)
    with pytest.raises(ValueError, match="only 5 are known"):
        bm.allocate_slots(a, 6)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 12)])
def test_constructor_validates(num_blocks, block_size):
    with pytest.raises(ValueError, match=str(num_blocks if num_blocks < 1 else block_size)):
        BlockManager(num_blocks, block_size)
