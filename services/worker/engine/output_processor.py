"""Turns the scheduler's per-step token outputs into what a client streams.

Each request gets a `RequestStream`: incremental detokenization (never half a UTF-8 character),
stop-string matching with hold-back (text that could still begin a stop string is not sent
yet), timings, and the final summary. Pure Python; runs on the engine thread between steps so a
matched stop string finishes the request before the next step computes another token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.worker.tokenizer import IncrementalDetokenizer, Tokenizer

from .outputs import RequestOutput
from .request import RequestStatus


@dataclass(frozen=True)
class Timings:
    """Milliseconds, measured on the worker's monotonic clock."""

    queue_ms: float  # arrival -> first scheduled
    ttft_ms: float  # arrival -> first token
    decode_ms: float  # first token -> last token
    total_ms: float  # arrival -> finish


@dataclass(frozen=True)
class EngineEvent:
    """A moment in a request's life inside the engine (for traces). `time` is the engine clock
    (seconds, monotonic); names are the EVENT_* constants below."""

    name: str
    time: float
    attributes: Mapping[str, int | str] = field(default_factory=dict)


EVENT_QUEUED = "queued"
EVENT_SCHEDULED = "scheduled"  # first scheduled; cached_tokens = prompt tokens from the prefix cache
EVENT_PREFILL_CHUNK = "prefill_chunk"  # start, tokens
EVENT_FIRST_TOKEN = "first_token"
EVENT_PREEMPTED = "preempted"  # computed_tokens whose KV was dropped
EVENT_RESUMED = "resumed"  # prefix_hit_tokens, recomputed_tokens
EVENT_FINISHED = "finished"  # finish_status
EVENT_ABORTED = "aborted"  # generated_tokens, prefill_tokens (the wasted compute)


@dataclass(frozen=True)
class Completion:
    """The end of a request's stream."""

    status: RequestStatus
    stop_reason: str | int | None
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    timings: Timings
    events: tuple[EngineEvent, ...] = ()
    num_preemptions: int = 0
    recomputed_tokens: int = 0
    """Tokens whose KV a preemption dropped and the request had to compute again."""


@dataclass(frozen=True)
class StreamEvent:
    """One message for the client: a text delta with its tokens, and the completion if final."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple = ()
    completion: Completion | None = None


def _held_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class RequestStream:
    """Streaming state of one request (owned by the engine thread)."""

    request_id: str
    detokenizer: IncrementalDetokenizer
    stops: tuple[str, ...]
    prompt_tokens: int
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    pending: str = ""  # decoded text not yet sent (could start a stop string)
    num_output_tokens: int = 0
    cached_prompt_tokens: int = 0
    stopped_by: str | None = field(default=None)  # the stop string that matched
    events: list[EngineEvent] = field(default_factory=list)
    num_preemptions: int = 0
    lost_tokens: int = 0  # computed tokens dropped by the last preemption (0: not preempted)
    recomputed_tokens: int = 0
    prefill_tokens: int = 0  # prompt (and recomputed) positions run through the model

    @classmethod
    def create(cls, tokenizer: Tokenizer, request_id: str, stops: tuple[str, ...],
               prompt_tokens: int, arrival: float) -> "RequestStream":
        stream = cls(request_id, IncrementalDetokenizer(tokenizer, skip_special_tokens=True),
                     tuple(stops), prompt_tokens, arrival)
        stream.events.append(EngineEvent(EVENT_QUEUED, arrival, {"prompt_tokens": prompt_tokens}))
        return stream

    def mark_scheduled(self, start: int, num_new: int, num_tokens: int, now: float) -> int:
        """The request got `num_new` tokens from `start` in a step; it knows `num_tokens` (before
        the step samples another). Returns how many of them are prefill: every position before
        the last known token, and the last one too while it is still the prompt's (a decode
        step's single position, which samples the next token, is not prefill; a preempted
        request recomputing its outputs is)."""
        prefill_end = max(num_tokens - 1, self.prompt_tokens)
        prefill = max(0, min(start + num_new, prefill_end) - start)
        self.prefill_tokens += prefill
        if self.first_scheduled is None:
            self.first_scheduled = now
            self.events.append(EngineEvent(EVENT_SCHEDULED, now, {"cached_tokens": start}))
        elif self.lost_tokens:
            recompute = max(0, self.lost_tokens - start)
            self.recomputed_tokens += recompute
            self.events.append(EngineEvent(EVENT_RESUMED, now, {
                "prefix_hit_tokens": start, "recomputed_tokens": recompute}))
            self.lost_tokens = 0
        if start + num_new < num_tokens or num_new > 1:  # not a plain decode step
            self.events.append(EngineEvent(EVENT_PREFILL_CHUNK, now,
                                           {"start": start, "tokens": num_new}))
        return prefill

    def mark_preempted(self, computed_tokens: int, now: float) -> None:
        """The scheduler dropped the request's KV (`computed_tokens` of it) to free blocks."""
        self.num_preemptions += 1
        self.lost_tokens = max(self.lost_tokens, computed_tokens)
        self.events.append(EngineEvent(EVENT_PREEMPTED, now, {"computed_tokens": computed_tokens}))

    def process(self, out: RequestOutput, now: float) -> StreamEvent:
        """Consumes one step's output. The event carries a completion when the request ended:
        by the scheduler (EOS, stop token, length) or by a stop string matched here, in which
        case the caller must also finish the request in the scheduler."""
        if out.new_token_ids and self.first_token is None:
            self.first_token = now
            self.events.append(EngineEvent(EVENT_FIRST_TOKEN, now))
        self.num_output_tokens += len(out.new_token_ids)
        self.cached_prompt_tokens = out.num_cached_tokens or 0
        for tok in out.new_token_ids:
            self.pending += self.detokenizer.push(tok)
        text = self._release(final=out.finished)
        logprobs = (out.logprobs,) if out.logprobs is not None else ()
        completion = None
        if self.stopped_by is not None:
            # Matched a stop string: the request ends here even if the scheduler has not
            # finished it (the engine then finishes it in the scheduler).
            completion = self._completion(RequestStatus.FINISHED_STOPPED, self.stopped_by, now)
        elif out.finished:
            completion = self._completion(out.status, out.stop_reason, now)
        return StreamEvent(self.request_id, text, tuple(out.new_token_ids), logprobs, completion)

    def _release(self, final: bool) -> str:
        if self.stopped_by is not None:
            return ""
        if self.stops:
            hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
            if hits:
                pos, stop = min(hits)
                self.stopped_by = stop
                text, self.pending = self.pending[:pos], ""
                return text
        if final:
            self.pending += self.detokenizer.flush()
            text, self.pending = self.pending, ""
            return text
        keep = _held_suffix(self.pending, self.stops) if self.stops else 0
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text

    def finish(self, status: RequestStatus, stop_reason: str | int | None,
               now: float) -> StreamEvent:
        """The final event for a request that ended without a step output (an abort)."""
        return StreamEvent(self.request_id, "", (), (),
                           self._completion(status, stop_reason, now))

    def _completion(self, status: RequestStatus, stop_reason: str | int | None,
                    now: float) -> Completion:
        def ms(a: float | None, b: float | None) -> float:
            return max(0.0, (b - a) * 1000.0) if a is not None and b is not None else 0.0

        if status is RequestStatus.FINISHED_ABORTED:
            self.events.append(EngineEvent(EVENT_ABORTED, now, {
                "generated_tokens": self.num_output_tokens,
                "prefill_tokens": self.prefill_tokens}))
        else:
            self.events.append(EngineEvent(EVENT_FINISHED, now, {"finish_status": status.name}))
        return Completion(
            status=status,
            stop_reason=stop_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.num_output_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            timings=Timings(
                queue_ms=ms(self.arrival, self.first_scheduled or now),
                ttft_ms=ms(self.arrival, self.first_token),
                decode_ms=ms(self.first_token, now),
                total_ms=ms(self.arrival, now),
            ),
            events=tuple(self.events),
            num_preemptions=self.num_preemptions,
            recomputed_tokens=self.recomputed_tokens,
        )
