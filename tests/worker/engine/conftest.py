"""Factories for engine-core tests: requests, block managers, schedulers and a fake model step."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from services.worker.engine import (
    BlockManager,
    ModelOutput,
    Request,
    RequestOutput,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

SampleFn = Callable[[Request, int], int]


def _new_request(
    request_id: str,
    prompt: Sequence[int] | int,
    *,
    max_tokens: int = 16,
    eos: Sequence[int] = (),
    arrival_time: float = 0.0,
    **sampling: object,
) -> Request:
    """A request; an int prompt means that many distinct tokens derived from the id."""
    if isinstance(prompt, int):
        base = 10_000 * (1 + sum(ord(c) for c in request_id))
        prompt = [base + i for i in range(prompt)]
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    return Request(request_id, tuple(prompt), params, arrival_time, frozenset(eos))


def position_token(request: Request, position: int) -> int:
    """Default fake model: the token sampled for `position` is 1000 + position."""
    return 1000 + position


def _run_step(
    scheduler: Scheduler, sample: SampleFn = position_token
) -> tuple[SchedulerOutput, list[RequestOutput]]:
    """schedule -> fake execute -> update, then check every invariant."""
    out = scheduler.schedule()
    sampled = {
        item.request_id: sample(item.request, item.end_position)
        for item in out.scheduled
        if item.will_sample
    }
    results = scheduler.update_from_output(out, ModelOutput(sampled))
    scheduler.check_integrity()
    return out, results


def _new_scheduler(
    num_blocks: int = 16, block_size: int = 4, enable_prefix_caching: bool = True, **config: int
) -> Scheduler:
    config.setdefault("max_model_len", 256)
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(SchedulerConfig(**config), block_manager)


@pytest.fixture
def make_request() -> Callable[..., Request]:
    return _new_request


@pytest.fixture
def make_scheduler() -> Callable[..., Scheduler]:
    return _new_scheduler


@pytest.fixture
def run_step() -> Callable[..., tuple[SchedulerOutput, list[RequestOutput]]]:
    return _run_step
