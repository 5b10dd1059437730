"""Paged KV block manager with hash-chained prefix caching.

Blocks are numbered 0..num_blocks-1; none is reserved (the runner may pad block tables with any id
because it masks by sequence length). Each block is either FREE (ref_cnt 0, in the free queue) or
USED (ref_cnt = number of requests holding it). A free block may still be CACHED: it keeps its
hash and is findable until the allocator reuses it for something else.

Free queue: eviction order, head first. Allocation takes from the head; freed blocks join the
tail; a request's blocks are freed in reverse so its tail blocks are evicted before its prefix,
and prefixes shared by many requests survive longest.

Prefix caching: only FULL blocks are hashed. A block's hash chains on its parent's:
`value = sha256(parent value, token ids)[:8]`, stable across processes so a router can compute the
same hashes for prefix-affinity routing. A lookup hit is verified against the stored token ids and
parent hash, so a hash collision never serves the wrong KV. One block per hash value: when a second
block fills with the same content (two requests computed it independently) it simply stays unhashed.

When blocks are published: `allocate_slots` hashes the blocks that become full given the tokens
scheduled in this step, as vLLM v1 does. A later request in the same step may hit them; that is
sound because the runner writes every scheduled token's KV for a layer before attention in that
layer reads the cache. Blocks are never published for tokens that are not scheduled.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.worker.engine.config import is_power_of_two
from services.worker.engine.request import Request


@dataclass(frozen=True, slots=True)
class BlockHash:
    """Identity of a full block's contents, chained on its whole prefix."""

    value: int
    """64-bit hash of (parent value, token ids); the cache map key."""
    parent_value: int | None
    """The previous block's value (None for a sequence's first block)."""
    token_ids: tuple[int, ...]
    """The block's tokens, kept to verify hits."""


def hash_block_tokens(parent_value: int | None, token_ids: Sequence[int]) -> int:
    """Stable 64-bit hash of a block's tokens chained on its parent's hash (token ids < 2**32)."""
    digest = hashlib.sha256()
    digest.update(b"\x00" if parent_value is None else b"\x01" + parent_value.to_bytes(8, "little"))
    digest.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(digest.digest()[:8], "little")


def compute_block_hash(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    parent_value = None if parent is None else parent.value
    tokens = tuple(token_ids)
    return BlockHash(hash_block_tokens(parent_value, tokens), parent_value, tokens)


@dataclass(slots=True)
class Block:
    block_id: int
    ref_cnt: int = 0
    """Number of live requests holding this block."""
    block_hash: BlockHash | None = None
    """Set while the block is published in the prefix cache."""

    @property
    def token_ids(self) -> tuple[int, ...] | None:
        return None if self.block_hash is None else self.block_hash.token_ids


@dataclass
class PrefixCacheStats:
    """Counters since start, in tokens, recorded once per admission (resumes included)."""

    num_queries: int = 0
    """Tokens of admitted requests that were looked up."""
    num_hits: int = 0
    """Of those, tokens served from cached blocks."""
    num_admissions: int = 0
    """Admissions that consulted the cache."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Owns the blocks, the free queue and the prefix-cache map; knows nothing of scheduling."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if not is_power_of_two(block_size):
            raise ValueError(f"block_size must be a power of two >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # hash value -> block id
        # Per holding request: how many leading blocks were already considered for publishing.
        self._num_published: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently published in the prefix cache (free or in use)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest verified cached prefix of a request not yet holding blocks: (block ids, tokens).

        Never the whole sequence: the last known token is always left to compute so the model
        produces logits, so at most (num_tokens - 1) // block_size blocks hit. No side effects;
        pass the ids to `allocate_slots` to take them.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = max(0, request.num_tokens - 1) // self.block_size
        hashes = self._ensure_block_hashes(request, max_blocks)
        block_ids: list[int] = []
        seen: set[int] = set()
        for block_hash in hashes[:max_blocks]:
            block_id = self._cached.get(block_hash.value)
            # Verify contents and parent; a repeat would mean a hash collision along the chain.
            if block_id is None or self.blocks[block_id].block_hash != block_hash:
                break
            if block_id in seen:
                break
            seen.add(block_id)
            block_ids.append(block_id)
        return block_ids, len(block_ids) * self.block_size

    def can_allocate(
        self, request: Request, num_new_tokens: int, new_computed_block_ids: Sequence[int] = ()
    ) -> bool:
        """Whether `allocate_slots` with the same arguments would succeed."""
        num_new_blocks, _ = self._plan(request, num_new_tokens, new_computed_block_ids)
        touched_free = sum(1 for b in new_computed_block_ids if self.blocks[b].ref_cnt == 0)
        return num_new_blocks + touched_free <= len(self._free)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_block_ids: Sequence[int] = ()
    ) -> list[int] | None:
        """Give the request room for `num_new_tokens` more tokens; None if blocks run short.

        `new_computed_block_ids` (from `get_computed_blocks`, only when the request holds no blocks)
        are taken first: removed from the free queue if there and ref-counted. Then fresh blocks
        come from the free-queue head, dropping any stale hash. Blocks that become full with the
        scheduled tokens are published. Returns the fresh block ids; on None nothing changed.
        """
        if not self.can_allocate(request, num_new_tokens, new_computed_block_ids):
            return None
        num_new_blocks, num_tokens_after = self._plan(
            request, num_new_tokens, new_computed_block_ids
        )
        if not request.block_ids:
            self._record_admission(request, len(new_computed_block_ids))
            self._num_published[request.request_id] = len(new_computed_block_ids)
        for block_id in new_computed_block_ids:
            self._touch(self.blocks[block_id])
        new_block_ids = [self._take_free_block() for _ in range(num_new_blocks)]
        request.block_ids.extend(new_computed_block_ids)
        request.block_ids.extend(new_block_ids)
        if self.enable_prefix_caching:
            self._publish_full_blocks(request, num_tokens_after)
        return new_block_ids

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, and clear its block list."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise AssertionError(f"{request.request_id} freed block {block_id} below zero")
            if block.ref_cnt == 0:
                self._free[block_id] = None  # joins the tail: evicted last
        request.block_ids.clear()
        self._num_published.pop(request.request_id, None)

    def reset_prefix_cache(self) -> int:
        """Unpublish every cached block (e.g. after new weights); returns how many were dropped.

        Safe while requests run: their blocks just stop being findable.
        """
        for block_id in self._cached.values():
            self.blocks[block_id].block_hash = None
        dropped = len(self._cached)
        self._cached.clear()
        return dropped

    # -- internals ---------------------------------------------------------------------------

    def _plan(
        self, request: Request, num_new_tokens: int, computed: Sequence[int]
    ) -> tuple[int, int]:
        """(fresh blocks needed, tokens covered after the step) for an allocation request."""
        if num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1, got {num_new_tokens}")
        if computed and (request.block_ids or request.num_computed_tokens):
            raise ValueError(
                f"request {request.request_id} already holds blocks; computed blocks are only "
                "taken at admission"
            )
        uncached = [b for b in computed if self.blocks[b].block_hash is None]
        if uncached or len(set(computed)) != len(computed):
            raise ValueError(f"computed blocks {list(computed)} are not distinct cached blocks")
        num_tokens_after = request.num_computed_tokens + len(computed) * self.block_size
        num_tokens_after += num_new_tokens
        if num_tokens_after > request.num_tokens:
            raise ValueError(
                f"request {request.request_id}: cannot schedule up to token {num_tokens_after}, "
                f"only {request.num_tokens} are known"
            )
        held = len(request.block_ids) + len(computed)
        return max(0, _cdiv(num_tokens_after, self.block_size) - held), num_tokens_after

    def _record_admission(self, request: Request, num_hit_blocks: int) -> None:
        if self.enable_prefix_caching:
            self.stats.num_admissions += 1
            self.stats.num_queries += request.num_tokens
            self.stats.num_hits += num_hit_blocks * self.block_size

    def _touch(self, block: Block) -> None:
        if block.ref_cnt == 0:
            del self._free[block.block_id]
        block.ref_cnt += 1

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # reused for new content: evict the stale entry
            del self._cached[block.block_hash.value]
            block.block_hash = None
        block.ref_cnt = 1
        return block_id

    def _publish_full_blocks(self, request: Request, num_tokens: int) -> None:
        start = self._num_published[request.request_id]
        end = num_tokens // self.block_size
        if end <= start:
            return
        hashes = self._ensure_block_hashes(request, end)
        for index in range(start, end):
            block = self.blocks[request.block_ids[index]]
            block_hash = hashes[index]
            if block.block_hash is None and block_hash.value not in self._cached:
                block.block_hash = block_hash
                self._cached[block_hash.value] = block.block_id
        self._num_published[request.request_id] = end

    def _ensure_block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """Extend request.block_hashes to cover its first `num_blocks` full blocks."""
        hashes = request.block_hashes
        size = self.block_size
        num_blocks = min(num_blocks, request.num_tokens // size)
        start = len(hashes)
        if start >= num_blocks:
            return hashes
        tokens = request.get_token_ids(start * size, num_blocks * size)
        parent = hashes[-1] if hashes else None
        for offset in range(0, len(tokens), size):
            parent = compute_block_hash(parent, tokens[offset : offset + size])
            hashes.append(parent)
        return hashes

    # -- integrity -----------------------------------------------------------------------------

    def check_integrity(self, requests: Iterable[Request]) -> None:
        """Raise AssertionError naming the first broken invariant.

        `requests` are all live requests holding blocks (the scheduler's running list).
        """
        holders = [0] * self.num_blocks
        for request in requests:
            for block_id in request.block_ids:
                holders[block_id] += 1
            self._check_request_blocks(request)
        for block in self.blocks:
            in_free = block.block_id in self._free
            if block.ref_cnt != holders[block.block_id]:
                raise AssertionError(
                    f"block {block.block_id} ref_cnt={block.ref_cnt} "
                    f"but {holders[block.block_id]} live requests hold it"
                )
            if in_free == (block.ref_cnt > 0):
                raise AssertionError(
                    f"block {block.block_id} ref_cnt={block.ref_cnt} but in_free_queue={in_free}"
                )
            if block.block_hash and self._cached.get(block.block_hash.value) != block.block_id:
                raise AssertionError(f"block {block.block_id} is hashed but not in the cache map")
        used = sum(1 for block in self.blocks if block.ref_cnt > 0)
        if used + len(self._free) != self.num_blocks:  # catches ids outside 0..num_blocks-1
            raise AssertionError(f"{used} used + {len(self._free)} free != {self.num_blocks}")
        for value, block_id in self._cached.items():
            block_hash = self.blocks[block_id].block_hash
            if block_hash is None or block_hash.value != value:
                raise AssertionError(f"cache maps {value:#x} to block {block_id} ({block_hash})")
        if set(self._num_published) != {r.request_id for r in requests if r.block_ids}:
            raise AssertionError(f"tracked holders {sorted(self._num_published)} != live requests")

    def _check_request_blocks(self, request: Request) -> None:
        if len(set(request.block_ids)) != len(request.block_ids):
            raise AssertionError(f"{request.request_id} holds a block twice: {request.block_ids}")
        num_full = request.num_tokens // self.block_size
        for index, block_id in enumerate(request.block_ids):
            block = self.blocks[block_id]
            if index >= num_full and block.ref_cnt != 1:
                raise AssertionError(
                    f"partial block {block_id} of {request.request_id} is shared "
                    f"(ref_cnt={block.ref_cnt})"
                )
            hashes = request.block_hashes
            if block.block_hash and (index >= len(hashes) or hashes[index] != block.block_hash):
                raise AssertionError(
                    f"block {block_id} (index {index} of {request.request_id}) is published "
                    "under a hash that does not match the request's tokens"
                )
