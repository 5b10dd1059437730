"""The synchronous engine core: `step()` is schedule -> execute -> update; streaming hangs off it.

Single-threaded by contract: `add_request`, `abort` and `step` are called from one thread (the
AsyncEngine's engine thread), so aborts always land between steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from services.worker.model.loader import LoadedModel

from .block_manager import BlockManager
from .config import CacheConfig, SchedulerConfig
from .model_runner import ModelRunner
from .output_processor import RequestStream, StreamEvent
from .request import Request, RequestStatus
from .sampling_params import SamplingParams
from .scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Monotonic counters since start (the metrics layer reads and exports them)."""

    steps: int = 0
    prompt_tokens_computed: int = 0  # prefill tokens run through the model (recompute included)
    generation_tokens: int = 0
    preemptions: int = 0
    aborted_requests: int = 0
    # Wasted compute: work done for requests that were then aborted (not finished).
    aborted_prefill_tokens: int = 0  # their prefill tokens computed (recompute included)
    aborted_generated_tokens: int = 0  # their output tokens generated
    recomputed_tokens: int = 0  # recomputed after preemption; counted when the request ends
    step_seconds: float = 0.0  # wall time inside step(): busy time (mean step = this / steps)


class LLMEngine:
    """Continuous batching over a paged KV cache for one model."""

    def __init__(self, loaded: LoadedModel, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig,
                 clock: Callable[[], float] = time.monotonic,
                 attention_backend: str | None = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.runner = ModelRunner(loaded, cache_config, attention_backend=attention_backend)
        self.block_manager = BlockManager(self.runner.num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self.clock = clock
        self.stats = EngineStats()
        self._streams: dict[str, RequestStream] = {}

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        """Queues a request; raises InvalidArgument (bad params) or QueueFull (back-pressure)."""
        arrival = self.clock() if arrival_time is None else arrival_time
        request = Request(request_id, tuple(prompt_token_ids), params, arrival,
                          eos_token_ids=self.tokenizer.eos_token_ids)
        self.scheduler.add_request(request)
        self._streams[request_id] = RequestStream.create(
            self.tokenizer, request_id, params.stop, len(prompt_token_ids), arrival)

    def abort(self, request_id: str) -> StreamEvent | None:
        """Frees the request's blocks now; returns its final (ABORT) event, or None if unknown."""
        request = self.scheduler.get_request(request_id)
        if request is None or not self.scheduler.abort(request_id):
            return None
        stream = self._streams.pop(request_id)
        self.stats.aborted_requests += 1
        self.stats.aborted_prefill_tokens += stream.prefill_tokens
        self.stats.aborted_generated_tokens += request.num_output_tokens
        event = stream.finish(RequestStatus.FINISHED_ABORTED, None, self.clock())
        self.stats.recomputed_tokens += event.completion.recomputed_tokens
        return event

    def abort_all(self) -> list[StreamEvent]:
        return [e for rid in list(self._streams) if (e := self.abort(rid)) is not None]

    def step(self) -> list[StreamEvent]:
        """One iteration of continuous batching; returns the events to stream."""
        start = time.perf_counter()  # a duration, measured apart from the injectable clock
        so = self.scheduler.schedule()
        now = self.clock()
        for s in so.scheduled:
            # Before the update: it grows num_tokens, and the prefill split depends on it.
            self.stats.prompt_tokens_computed += self._streams[s.request_id].mark_scheduled(
                s.start_position, s.num_new_tokens, s.request.num_tokens, now)
        for rid in so.preempted_request_ids:
            request = self.scheduler.get_request(rid)
            self._streams[rid].mark_preempted(request.max_num_computed_tokens, now)
        model_output = self.runner.execute(so)
        outputs = self.scheduler.update_from_output(so, model_output)
        self._count(so, model_output)
        events = self._process(outputs)
        self.stats.step_seconds += time.perf_counter() - start
        return events

    def _count(self, so, model_output) -> None:
        st = self.stats
        st.steps += 1
        st.preemptions += len(so.preempted_request_ids)
        st.generation_tokens += len(model_output.sampled_token_ids)

    def _process(self, outputs) -> list[StreamEvent]:
        now = self.clock()
        events = []
        for out in outputs:
            stream = self._streams[out.request_id]
            event = stream.process(out, now)
            if event.completion is not None:
                self.stats.recomputed_tokens += event.completion.recomputed_tokens
                if not out.finished:  # a stop string matched; the scheduler did not stop it
                    self.scheduler.finish_request(out.request_id, RequestStatus.FINISHED_STOPPED,
                                                  stream.stopped_by)
                del self._streams[out.request_id]
            events.append(event)
        return events
