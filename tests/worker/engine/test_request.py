"""Request state, sampling-parameter validation and the engine configs."""

from __future__ import annotations

import math

import pytest

from services.worker.engine import (
    CacheConfig,
    InvalidArgument,
    Request,
    RequestStatus,
    SamplingParams,
    SchedulerConfig,
    num_blocks_for_budget,
)

# -- Request -----------------------------------------------------------------------------------


def test_request_token_accounting(make_request):
    request = make_request("a", [1, 2, 3], eos=[9])
    assert request.status is RequestStatus.WAITING and not request.is_finished
    assert request.eos_token_ids == frozenset({9})
    request.append_output_token(4)
    request.append_output_token(5)
    assert (request.num_prompt_tokens, request.num_output_tokens, request.num_tokens) == (3, 2, 5)
    assert request.all_token_ids == (1, 2, 3, 4, 5)
    assert request.get_token_ids(0, 2) == (1, 2)
    assert request.get_token_ids(2, 4) == (3, 4)
    assert request.get_token_ids(3, 5) == (4, 5)
    assert request.num_cached_tokens is None  # set at first admission


def test_prompt_is_frozen_and_equality_is_identity():
    params = SamplingParams()
    a = Request("a", [1, 2], params, arrival_time=1.5)
    b = Request("a", [1, 2], params, arrival_time=1.5)
    assert a.prompt_token_ids == (1, 2)
    assert a != b and len({a, b}) == 2


def test_recomputed_tokens_count_only_work_redone_after_preemption(make_request):
    request = make_request("a", 10)
    request.record_computed(8)
    request.preempt()
    assert (request.status, request.num_computed_tokens, request.num_preemptions) == (
        RequestStatus.PREEMPTED,
        0,
        1,
    )
    request.num_computed_tokens = 4  # resumed with one cached block of 4
    request.record_computed(6)
    assert request.num_recomputed_tokens == 4  # tokens 4..7, not the new 8..9
    assert request.num_computed_tokens == 10


def test_preempt_requires_blocks_freed_first(make_request):
    request = make_request("a", 4)
    request.block_ids.append(0)
    with pytest.raises(ValueError, match="still holds blocks"):
        request.preempt()


def test_finished_statuses():
    finished = {s for s in RequestStatus if s.is_finished()}
    assert finished == {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
    }


# -- SamplingParams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field, shown",
    [
        ({"temperature": -0.1}, "temperature", "got -0.1"),
        ({"temperature": math.nan}, "temperature", "got nan"),
        ({"temperature": math.inf}, "temperature", "got inf"),
        ({"top_p": 0.0}, "top_p", "got 0.0"),
        ({"top_p": 1.5}, "top_p", "got 1.5"),
        ({"top_p": math.nan}, "top_p", "got nan"),
        ({"top_k": 0}, "top_k", "got 0"),
        ({"min_p": -0.1}, "min_p", "got -0.1"),
        ({"min_p": 1.1}, "min_p", "got 1.1"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "got 0.0"),
        ({"presence_penalty": 2.5}, "presence_penalty", "got 2.5"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "got -2.5"),
        ({"max_tokens": 0}, "max_tokens", "got 0"),
        ({"logprobs": 21}, "logprobs", "got 21"),
        ({"logprobs": -1}, "logprobs", "got -1"),
        ({"stop": ("",)}, "stop", "non-empty"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids", "got [-1]"),
        ({"seed": -1}, "seed", "got -1"),
        ({"seed": 2**63}, "seed", f"got {2**63}"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, field, shown):
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert shown in str(info.value)


def test_sampling_params_accept_edges_and_freeze_lists():
    params = SamplingParams(
        temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, presence_penalty=-2.0,
        frequency_penalty=2.0, logprobs=20, stop=["a"], stop_token_ids=[3],
    )
    assert params.stop == ("a",) and params.stop_token_ids == (3,)
    assert hash(params) == hash(SamplingParams(**{**params.__dict__}))
    assert params.greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7).greedy


def test_validate_against_model_length():
    params = SamplingParams(max_tokens=16)
    params.validate(max_model_len=116, prompt_len=100)
    with pytest.raises(InvalidArgument, match="100 tokens .* max_tokens 16 = 116 exceeds "
                       "max_model_len 115") as info:
        params.validate(max_model_len=115, prompt_len=100)
    assert info.value.field == "max_tokens"
    with pytest.raises(InvalidArgument) as info:
        params.validate(max_model_len=115, prompt_len=0)
    assert info.value.field == "prompt"


# -- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 12}, "block_size must be a power of two >= 1, got 12"),
        ({"block_size": 0}, "got 0"),
        ({"num_blocks": 0}, "num_blocks must be >= 1 when set, got 0"),
        ({"memory_bytes": -5}, "got -5"),
        ({"memory_fraction": 1.5}, r"memory_fraction must be in \(0, 1\], got 1.5"),
        ({"num_blocks": 4, "memory_fraction": 0.5}, "at most one of"),
    ],
)
def test_cache_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**kwargs)


def test_cache_config_defaults():
    config = CacheConfig()
    assert (config.block_size, config.enable_prefix_caching) == (16, True)
    assert CacheConfig(memory_fraction=0.9).memory_fraction == 0.9


def test_num_blocks_for_budget():
    per_block = 2 * 30 * 16 * 3 * 64 * 2  # layers, block size, kv heads, head dim, bf16
    assert num_blocks_for_budget(10 * per_block + 7, per_block) == 10
    with pytest.raises(ValueError, match=f"budget of 100 bytes holds no block of {per_block}"):
        num_blocks_for_budget(100, per_block)
    with pytest.raises(ValueError, match="bytes_per_block must be >= 1, got 0"):
        num_blocks_for_budget(100, 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_model_len": 0}, "max_model_len must be an integer >= 1, got 0"),
        ({"max_num_seqs": 0}, "max_num_seqs must be an integer >= 1, got 0"),
        ({"max_num_batched_tokens": -1}, "got -1"),
        ({"max_waiting": 0}, "max_waiting"),
        ({"long_prefill_token_threshold": 0}, "long_prefill_token_threshold must be >= 1"),
    ],
)
def test_scheduler_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**{"max_model_len": 128, **kwargs})


def test_scheduler_config_requires_max_model_len():
    with pytest.raises(TypeError):
        SchedulerConfig()  # type: ignore[call-arg]
    assert SchedulerConfig(max_model_len=2048).max_num_batched_tokens == 512
