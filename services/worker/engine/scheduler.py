"""The scheduler: one token-accounting model, waiting/running queues, preemption by recompute.

Each step every scheduled request gets `num_new_tokens` so that its num_computed_tokens catches
up with num_tokens (prompt + outputs). Chunked prefill, prefix hits, resumption after preemption
and decode are the same case; there is no prefill or decode mode.

Engine contract (single thread):

    scheduler_output = scheduler.schedule()
    model_output = runner.execute(scheduler_output)
    outputs = scheduler.update_from_output(scheduler_output, model_output)

All calls come from one thread. `add_request`, `abort` and `finish_request` (stop strings, found
by the engine's detokenizer) belong between steps. An abort between `schedule` and
`update_from_output` is still safe once `execute` has returned: freed blocks are only handed out
again by the next `schedule`, and the update skips the ended request. What must never happen is a
`schedule` while a previous step's `execute` is still writing KV.

The scheduler only moves requests between queues and sets their status; blocks belong to the
BlockManager and every other piece of state to the Request.
"""

from __future__ import annotations

from collections import deque

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import SchedulerConfig
from services.worker.engine.errors import InvalidArgument, QueueFull
from services.worker.engine.outputs import (
    ModelOutput,
    RequestOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from services.worker.engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        """FIFO admission queue; preempted requests re-enter at the front."""
        self.running: list[Request] = []
        """Admitted requests in admission order; the last one is the first preempted."""
        self._requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []

    # -- queries ---------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    # -- admission and cancellation ----------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Validate and queue a new request; raises InvalidArgument or QueueFull."""
        if request.request_id in self._requests:
            raise InvalidArgument("request_id", f"{request.request_id!r} is already in flight")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id} is not fresh: {request.status.name}")
        params = request.sampling_params
        params.validate(self.config.max_model_len, request.num_prompt_tokens)
        self._check_fits_cache(request)
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFull(
                f"waiting queue is full ({self.config.max_waiting} requests, max_waiting); "
                "retry later"
            )
        self.waiting.append(request)
        self._requests[request.request_id] = request

    def _check_fits_cache(self, request: Request) -> None:
        # The last sampled token is never computed, so the KV peak is prompt + max_tokens - 1.
        # Rejecting what could never fit alone guarantees progress: with nothing running, the
        # head of the waiting queue can always be admitted.
        peak = request.num_prompt_tokens + request.sampling_params.max_tokens - 1
        size = self.block_manager.block_size
        needed = -(-peak // size)
        if needed > self.block_manager.num_blocks:
            raise InvalidArgument(
                "max_tokens",
                f"prompt + max_tokens needs {needed} KV blocks of {size} tokens but the cache "
                f"has {self.block_manager.num_blocks}",
            )

    def abort(self, request_id: str) -> bool:
        """Cancel a request, freeing its blocks now; False if it is unknown or already done."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: str | int | None = None
    ) -> bool:
        """End a request from outside (stop string, abort): free its blocks, drop it from its queue.

        False if the id is unknown (never added, or already finished)."""
        if not status.is_finished():
            raise ValueError(f"finish_request needs a finished status, got {status.name}")
        request = self._requests.get(request_id)
        if request is None:
            return False
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status, stop_reason)
        return True

    def _finish(
        self, request: Request, status: RequestStatus, stop_reason: str | int | None
    ) -> None:
        self.block_manager.free(request)
        request.status = status
        request.stop_reason = stop_reason
        del self._requests[request.request_id]
        self._finished_ids.append(request.request_id)

    # -- the step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running requests first, then admissions in FIFO order."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        # After a preemption the cache is under pressure: admit nothing new this step.
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(tuple(scheduled), tuple(preempted), tuple(finished))

    def _chunk_size(self, request: Request, num_computed: int, budget: int) -> int:
        num_new = min(request.num_tokens - num_computed, budget)
        threshold = self.config.long_prefill_token_threshold
        return num_new if threshold is None else min(num_new, threshold)

    def _schedule_running(
        self, budget: int, scheduled: list[ScheduledRequest], preempted: list[str]
    ) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._chunk_size(request, request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # the request preempted itself: it was the last running one
            scheduled.append(_scheduled(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Allocate for a running request, preempting the newest running ones until it fits."""
        while self.block_manager.allocate_slots(request, num_new) is None:
            victim = self.running.pop()
            self.block_manager.free(victim)
            victim.preempt()
            self.waiting.appendleft(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_ids, num_hit = self.block_manager.get_computed_blocks(request)
            num_new = self._chunk_size(request, num_hit, budget)
            if self.block_manager.allocate_slots(request, num_new, computed_ids) is None:
                break  # no preemption to admit new work; keep FIFO order
            self.waiting.popleft()
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(_scheduled(request, num_new))
            budget -= num_new

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_output: ModelOutput
    ) -> list[RequestOutput]:
        """Advance computed tokens, append sampled tokens, stop and free finished requests."""
        live = [item for item in scheduler_output.scheduled if self._is_live(item)]
        missing = [
            item.request_id
            for item in live
            if item.will_sample and item.request_id not in model_output.sampled_token_ids
        ]
        if missing:
            raise ValueError(f"model output has no sampled token for {missing}")
        outputs: list[RequestOutput] = []
        any_finished = False
        for item in live:
            request = item.request
            request.record_computed(item.num_new_tokens)
            if not item.will_sample:
                continue  # partial prefill: no token yet
            token_id = model_output.sampled_token_ids[request.request_id]
            request.append_output_token(token_id)
            stop = self._check_stop(request, token_id)
            if stop is not None:
                status, stop_reason = stop
                self._finish(request, status, stop_reason)
                any_finished = True
            outputs.append(_request_output(request, token_id, model_output))
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs

    def _is_live(self, item: ScheduledRequest) -> bool:
        """False for a request aborted or finished after schedule() (its blocks are free)."""
        request = item.request
        if self._requests.get(request.request_id) is not request:
            return False
        if request.num_computed_tokens != item.start_position:
            raise ValueError(f"request {request.request_id} was already updated for this step")
        return True

    def _check_stop(
        self, request: Request, token_id: int
    ) -> tuple[RequestStatus, int | None] | None:
        """Stop on EOS or a stop token id before length, so a final EOS reports as a stop."""
        params = request.sampling_params
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None

    # -- integrity -----------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Queue, status and block invariants, valid between steps; raises AssertionError."""
        waiting_ids = [r.request_id for r in self.waiting]
        running_ids = [r.request_id for r in self.running]
        all_ids = waiting_ids + running_ids
        if len(set(all_ids)) != len(all_ids) or set(all_ids) != set(self._requests):
            raise AssertionError(f"queues {all_ids} disagree with requests {list(self._requests)}")
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError(f"{len(self.running)} running > max_num_seqs")
        for request in self.waiting:
            if request.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                raise AssertionError(f"waiting {request.request_id} is {request.status.name}")
            if request.block_ids or request.num_computed_tokens:
                raise AssertionError(f"waiting {request.request_id} holds blocks or computed KV")
        size = self.block_manager.block_size
        for request in self.running:
            if request.status is not RequestStatus.RUNNING:
                raise AssertionError(f"running {request.request_id} is {request.status.name}")
            if not 0 < request.num_tokens - request.num_computed_tokens:
                raise AssertionError(f"running {request.request_id} has nothing left to compute")
            if len(request.block_ids) != -(-request.num_computed_tokens // size):
                raise AssertionError(
                    f"running {request.request_id}: {len(request.block_ids)} blocks for "
                    f"{request.num_computed_tokens} computed tokens"
                )
        self.block_manager.check_integrity(self.running)


def _scheduled(request: Request, num_new_tokens: int) -> ScheduledRequest:
    start = request.num_computed_tokens
    return ScheduledRequest(
        request=request,
        num_new_tokens=num_new_tokens,
        start_position=start,
        will_sample=start + num_new_tokens == request.num_tokens,
        block_ids=tuple(request.block_ids),
    )


def _request_output(request: Request, token_id: int, model_output: ModelOutput) -> RequestOutput:
    logprobs = model_output.logprobs
    if logprobs is not None:
        logprobs = logprobs.get(request.request_id)
    return RequestOutput(
        request_id=request.request_id,
        new_token_ids=(token_id,),
        status=request.status,
        stop_reason=request.stop_reason,
        num_cached_tokens=request.num_cached_tokens or 0,
        logprobs=logprobs,
    )

