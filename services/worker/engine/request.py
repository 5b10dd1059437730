"""A request and all of its state; the scheduler moves requests, it does not hold their state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.worker.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from services.worker.engine.block_manager import BlockHash


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = enum.auto()
    """Queued, never admitted."""
    RUNNING = enum.auto()
    """Admitted: holds KV blocks and is scheduled each step while budget allows."""
    PREEMPTED = enum.auto()
    """Lost its blocks to a running request; queued at the front to be recomputed."""
    FINISHED_STOPPED = enum.auto()
    """Hit EOS, a stop token id or (via the engine) a stop string."""
    FINISHED_LENGTH = enum.auto()
    """Reached max_tokens or max_model_len."""
    FINISHED_ABORTED = enum.auto()
    """Cancelled by the client or the engine."""

    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


@dataclass(eq=False)
class Request:
    """One generation request: its tokens, progress, KV blocks and lifecycle.

    Token accounting: `num_tokens` (prompt + outputs) is what the request knows;
    `num_computed_tokens` is how many of those have KV in the cache. Each step the scheduler gives
    the request `num_new_tokens` to close the gap; when a step reaches `num_tokens` the model
    samples one more token. Equality is identity: two requests are never "the same" by content.
    """

    request_id: str
    """Unique among unfinished requests."""
    prompt_token_ids: tuple[int, ...]
    """Prompt tokens (a list is accepted and frozen to a tuple)."""
    sampling_params: SamplingParams
    """How to sample and when to stop."""
    arrival_time: float
    """When the request arrived, from the caller's clock (the core never reads a clock)."""
    eos_token_ids: frozenset[int] = frozenset()
    """The model's end-of-sequence tokens; they stop the request unless ignore_eos."""

    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    """Lifecycle state; changed by the scheduler."""
    output_token_ids: list[int] = field(default_factory=list, init=False)
    """Generated tokens, in order; grown only through `append_output_token`."""
    num_computed_tokens: int = field(default=0, init=False)
    """Leading tokens whose KV is in the cache (or will be after the step in flight)."""
    block_ids: list[int] = field(default_factory=list, init=False)
    """KV blocks holding this request's tokens, in sequence order; managed by the BlockManager."""
    block_hashes: list[BlockHash] = field(default_factory=list, init=False, repr=False)
    """Chained hashes of the request's full blocks, computed lazily by the BlockManager. Content
    derived, so they stay valid across preemption."""
    num_cached_tokens: int | None = field(default=None, init=False)
    """Prompt tokens served from the prefix cache at FIRST admission (None until admitted). Kept
    unchanged by preemption: it is what the user is told about their prompt."""
    num_preemptions: int = field(default=0, init=False)
    """Times this request lost its blocks and was requeued."""
    num_recomputed_tokens: int = field(default=0, init=False)
    """Tokens computed a second (or later) time because a preemption discarded their KV."""
    stop_reason: str | int | None = field(default=None, init=False)
    """The stop string, stop token id or EOS id that finished the request (None for length, abort)."""
    _max_num_computed_tokens: int = field(default=0, init=False, repr=False)
    """High-water mark of num_computed_tokens, to count recomputation."""

    def __post_init__(self) -> None:
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens: everything the model can be fed."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> tuple[int, ...]:
        """Prompt then outputs (a fresh tuple; use `get_token_ids` for a slice)."""
        return self.prompt_token_ids + tuple(self.output_token_ids)

    @property
    def max_num_computed_tokens(self) -> int:
        """The most tokens that ever had KV at once (preemption drops them; this remembers)."""
        return self._max_num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished()

    def get_token_ids(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens at positions [start, end) of prompt + outputs, without copying the rest."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return tuple(self.output_token_ids[start - num_prompt : end - num_prompt])
        return self.prompt_token_ids[start:] + tuple(self.output_token_ids[: end - num_prompt])

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def record_computed(self, num_new_tokens: int) -> None:
        """Advance num_computed_tokens after a step, counting tokens recomputed after preemption."""
        start = self.num_computed_tokens
        end = start + num_new_tokens
        self.num_recomputed_tokens += max(0, min(end, self._max_num_computed_tokens) - start)
        self._max_num_computed_tokens = max(self._max_num_computed_tokens, end)
        self.num_computed_tokens = end

    def preempt(self) -> None:
        """Forget computed KV (the BlockManager freed the blocks first): recompute from scratch."""
        if self.block_ids:
            raise ValueError(f"request {self.request_id} still holds blocks {self.block_ids}")
        self.status = RequestStatus.PREEMPTED
        self.num_computed_tokens = 0
        self.num_preemptions += 1
