"""Frozen configuration for the KV cache and the scheduler.

Validation happens at construction and every message names the bad value. No I/O and no
environment reads here: the worker's config factory builds these from its own sources.
"""

from __future__ import annotations

from dataclasses import dataclass


def is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


@dataclass(frozen=True)
class CacheConfig:
    """How the paged KV cache is sized and whether prefix caching is on.

    At most one of `num_blocks`, `memory_bytes` and `memory_fraction` may be set; with none set the
    model runner applies its own default budget. The runner resolves the budget to a block count
    with `num_blocks_for_budget`.
    """

    block_size: int = 16
    """Tokens per KV block; a power of two."""
    num_blocks: int | None = None
    """Exact number of KV blocks (overrides any memory budget); mostly for tests and benchmarks."""
    memory_bytes: int | None = None
    """Absolute KV cache budget in bytes, resolved by the runner into a block count."""
    memory_fraction: float | None = None
    """Fraction in (0, 1] of free accelerator memory (after weights) given to the KV cache."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    prefault: bool = True
    """CPU: fault in every page of the KV pool at startup. The kernel zeroes a page on first
    touch (~0.9 s per GiB measured here), and without this that cost lands on the serving path,
    in the steps that first write each block: 0.52 of a 6.5 s prefill phase at 32 requests."""

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or not is_power_of_two(self.block_size):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size!r}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 when set, got {self.num_blocks}")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1 when set, got {self.memory_bytes}")
        if self.memory_fraction is not None and not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        sizing = {
            "num_blocks": self.num_blocks,
            "memory_bytes": self.memory_bytes,
            "memory_fraction": self.memory_fraction,
        }
        chosen = {name: value for name, value in sizing.items() if value is not None}
        if len(chosen) > 1:
            raise ValueError(
                f"set at most one of num_blocks, memory_bytes, memory_fraction; got {chosen}"
            )


def num_blocks_for_budget(budget_bytes: int, bytes_per_block: int) -> int:
    """Number of whole KV blocks that fit in `budget_bytes`.

    The runner computes `bytes_per_block = 2 * num_layers * block_size * num_kv_heads * head_dim *
    dtype_size` (K and V) and resolves the budget; this is only the arithmetic and its checks.
    """
    if bytes_per_block < 1:
        raise ValueError(f"bytes_per_block must be >= 1, got {bytes_per_block}")
    if budget_bytes < 0:
        raise ValueError(f"KV cache budget must be >= 0 bytes, got {budget_bytes}")
    num_blocks = budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes holds no block of {bytes_per_block} bytes; "
            "raise the memory budget or lower block_size"
        )
    return num_blocks


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits the scheduler applies every step."""

    max_model_len: int
    """Longest sequence (prompt + output tokens) a request may reach."""
    max_num_seqs: int = 32
    """Most requests running (holding KV blocks and scheduled) at once."""
    max_num_batched_tokens: int = 512
    """Token budget of one step, shared by decodes and prefill chunks."""
    max_waiting: int = 256
    """Most requests queued for admission; `add_request` raises QueueFull beyond it."""
    long_prefill_token_threshold: int | None = None
    """Largest prefill chunk one request may take in a step (None: only the step budget limits)."""

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        threshold = self.long_prefill_token_threshold
        if threshold is not None and threshold < 1:
            raise ValueError(f"long_prefill_token_threshold must be >= 1 when set, got {threshold}")
