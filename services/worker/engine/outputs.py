"""Plain messages crossing the scheduler boundary: SchedulerOutput out, ModelOutput in,
RequestOutput back to the engine. No tensors; tests build them by hand."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.worker.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: compute tokens [start_position, end_position)."""

    request: Request
    """The request itself (read-only for the runner)."""
    num_new_tokens: int
    """Tokens to compute this step (a prefill chunk, or 1 for a decode)."""
    start_position: int
    """Position of the first new token = num_computed_tokens before the step (after prefix hits)."""
    will_sample: bool
    """The step reaches the end of the known tokens, so the model must sample the next token."""
    block_ids: tuple[int, ...]
    """Snapshot of the request's block table, covering every token through this step."""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def end_position(self) -> int:
        return self.start_position + self.num_new_tokens

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The input tokens of this step."""
        return self.request.get_token_ids(self.start_position, self.end_position)


@dataclass(frozen=True)
class SchedulerOutput:
    """What one step computes, plus housekeeping for the runner's per-request state."""

    scheduled: tuple[ScheduledRequest, ...] = ()
    """Running requests first (in running order), then newly admitted ones."""
    preempted_request_ids: tuple[str, ...] = ()
    """Requests preempted (blocks freed, requeued for recompute) while building this step."""
    finished_request_ids: tuple[str, ...] = ()
    """Requests finished or aborted since the previous step; their blocks are already free."""

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class ModelOutput:
    """What the runner returns for a SchedulerOutput."""

    sampled_token_ids: Mapping[str, int] = field(default_factory=dict)
    """Next token per request id, for every scheduled request with will_sample."""
    logprobs: Mapping[str, Any] | None = None
    """Optional per-request logprobs payload, passed through to RequestOutput untouched."""


@dataclass(frozen=True)
class RequestOutput:
    """A request's progress from one step, for the engine to detokenize and stream."""

    request_id: str
    new_token_ids: tuple[int, ...]
    """Tokens generated this step (empty only in outputs the engine builds itself)."""
    status: RequestStatus
    """The request's status after this step."""
    stop_reason: str | int | None = None
    """Stop token id (or stop string) that finished the request; None otherwise."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at first admission."""
    logprobs: Any = None
    """The runner's logprobs payload for this request, if any."""

    @property
    def finished(self) -> bool:
        return self.status.is_finished()
