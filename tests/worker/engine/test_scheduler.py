"""Scheduler: token accounting, chunked prefill, preemption, aborts, stops and a randomized soak."""

from __future__ import annotations

import random

import pytest

from services.worker.engine import (
    InvalidArgument,
    ModelOutput,
    QueueFull,
    RequestStatus,
)


def _plan(out):
    """(request id, num_new_tokens, will_sample) per scheduled request."""
    return [(s.request_id, s.num_new_tokens, s.will_sample) for s in out.scheduled]


def test_chunked_prefill_under_the_token_budget(make_scheduler, make_request, run_step):
    scheduler = make_scheduler(num_blocks=16, block_size=16, max_num_batched_tokens=32)
    request = make_request("a", 100, max_tokens=2)
    scheduler.add_request(request)

    starts, chunks, produced = [], [], []
    for _ in range(4):
        out, results = run_step(scheduler)
        (item,) = out.scheduled
        starts.append(item.start_position)
        chunks.append(item.num_new_tokens)
        produced.append([r.new_token_ids for r in results])
    assert chunks == [32, 32, 32, 4]
    assert starts == [0, 32, 64, 96]
    assert produced == [[], [], [], [(1100,)]]  # a token only once the prompt is done
    assert request.num_computed_tokens == 100
    assert len(request.block_ids) == 7

    out, results = run_step(scheduler)
    assert _plan(out) == [("a", 1, True)]
    assert results[0].finished and results[0].status is RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == [1100, 1101]
    assert scheduler.block_manager.num_free_blocks == 16


def test_decodes_share_a_step_with_a_new_prefill_chunk(make_scheduler, make_request, run_step):
    scheduler = make_scheduler(max_num_batched_tokens=16)
    scheduler.add_request(make_request("a", 4))
    scheduler.add_request(make_request("b", 4))
    out, _ = run_step(scheduler)
    assert _plan(out) == [("a", 4, True), ("b", 4, True)]

    scheduler.add_request(make_request("c", 40))
    out, _ = run_step(scheduler)
    assert _plan(out) == [("a", 1, True), ("b", 1, True), ("c", 14, False)]
    assert out.total_num_scheduled_tokens == 16

    out, _ = run_step(scheduler)  # running requests go first: decodes are never starved
    assert _plan(out) == [("a", 1, True), ("b", 1, True), ("c", 14, False)]
    assert [s.start_position for s in out.scheduled] == [5, 5, 14]


def test_scheduled_request_tells_the_runner_what_to_compute(make_scheduler, make_request):
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=6)
    request = make_request("a", [11, 12, 13, 14, 15, 16, 17, 18, 19])
    scheduler.add_request(request)
    out = scheduler.schedule()
    (item,) = out.scheduled
    assert (item.start_position, item.end_position, item.will_sample) == (0, 6, False)
    assert item.token_ids == (11, 12, 13, 14, 15, 16)
    assert item.block_ids == (0, 1)
    scheduler.update_from_output(out, ModelOutput())

    out = scheduler.schedule()
    (item,) = out.scheduled
    assert item.token_ids == (17, 18, 19) and item.will_sample
    assert item.block_ids == (0, 1, 2)
    with pytest.raises(ValueError, match=r"no sampled token for \['a'\]"):
        scheduler.update_from_output(out, ModelOutput())
    assert request.num_computed_tokens == 6  # a rejected output changes nothing


def test_long_prefill_threshold_caps_each_chunk(make_scheduler, make_request, run_step):
    scheduler = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    scheduler.add_request(make_request("a", 20))
    scheduler.add_request(make_request("b", 3))
    chunks = [_plan(run_step(scheduler)[0]) for _ in range(3)]
    assert chunks == [
        [("a", 8, False), ("b", 3, True)],
        [("a", 8, False), ("b", 1, True)],
        [("a", 4, True), ("b", 1, True)],
    ]


def test_max_num_seqs_limits_admission(make_scheduler, make_request, run_step):
    scheduler = make_scheduler(max_num_seqs=2)
    for name, max_tokens in (("a", 1), ("b", 3), ("c", 1)):
        scheduler.add_request(make_request(name, 4, max_tokens=max_tokens))

    out, results = run_step(scheduler)
    assert [s.request_id for s in out.scheduled] == ["a", "b"]
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 1)  # a finished at once
    assert [r.request_id for r in results if r.finished] == ["a"]

    out, _ = run_step(scheduler)
    assert _plan(out) == [("b", 1, True), ("c", 4, True)]
    assert out.finished_request_ids == ("a",)


def test_preemption_takes_the_newest_and_resumes_with_prefix_hits(
    make_scheduler, make_request, run_step
):
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    bm = scheduler.block_manager
    a = make_request("a", 6, max_tokens=6)
    b = make_request("b", 6, max_tokens=6)
    scheduler.add_request(a)
    scheduler.add_request(b)
    for _ in range(3):
        run_step(scheduler)
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    assert bm.num_free_blocks == 0

    # a needs a third block: b, the newest, is preempted; a takes b's tail block first.
    out, _ = run_step(scheduler)
    assert _plan(out) == [("a", 1, True)]
    assert out.preempted_request_ids == ("b",)
    assert a.block_ids == [0, 1, 3]
    assert b.status is RequestStatus.PREEMPTED
    assert (b.block_ids, b.num_computed_tokens, b.num_preemptions) == ([], 0, 1)
    assert list(scheduler.waiting) == [b]

    # b's head block is still cached, but b cannot fit until a finishes.
    out, _ = run_step(scheduler)
    assert _plan(out) == [("a", 1, True)]
    out, results = run_step(scheduler)
    assert results[0].status is RequestStatus.FINISHED_LENGTH

    out, _ = run_step(scheduler)
    assert _plan(out) == [("b", 5, True)]
    assert out.scheduled[0].start_position == 4  # one cached full block: 4 tokens not recomputed
    assert b.block_ids == [2, 3, 1]
    assert b.num_cached_tokens == 0  # what the user is told: hits at first admission
    assert b.num_recomputed_tokens == 4  # tokens 4..7 had been computed before

    while scheduler.has_unfinished:
        run_step(scheduler)
    expected = [1000 + position for position in range(6, 12)]
    assert a.output_token_ids == expected
    assert b.output_token_ids == expected  # complete, nothing duplicated by the recompute
    assert bm.num_free_blocks == 4


def test_running_request_that_preempts_itself_waits(make_scheduler, make_request, run_step):
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    a = make_request("a", 4, max_tokens=5)  # peak 8 tokens: 2 blocks
    b = make_request("b", 4, max_tokens=5)
    scheduler.add_request(a)
    scheduler.add_request(b)
    run_step(scheduler)  # a=[0], b=[1]
    out, _ = run_step(scheduler)  # a takes block 2; b needs one more: b preempts itself
    assert _plan(out) == [("a", 1, True)]
    assert out.preempted_request_ids == ("b",)
    while scheduler.has_unfinished:
        run_step(scheduler)
    assert len(b.output_token_ids) == 5 and b.num_preemptions == 1


def test_abort_frees_blocks_immediately(make_scheduler, make_request, run_step):
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=2)
    for name in ("a", "b", "c"):
        scheduler.add_request(make_request(name, 6))
    run_step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 4

    assert scheduler.abort("a")
    assert scheduler.block_manager.num_free_blocks == 6
    assert scheduler.abort("c")  # still waiting
    assert not scheduler.abort("a") and not scheduler.abort("nope")
    scheduler.check_integrity()

    assert scheduler.abort("b")
    assert scheduler.block_manager.num_free_blocks == 8
    assert not scheduler.has_unfinished
    scheduler.check_integrity()
    out = scheduler.schedule()
    assert out.is_empty and out.finished_request_ids == ("a", "c", "b")


def test_abort_between_schedule_and_update_is_skipped(make_scheduler, make_request):
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 6))
    out = scheduler.schedule()
    assert scheduler.abort("a")
    assert scheduler.update_from_output(out, ModelOutput({"a": 1})) == []
    scheduler.check_integrity()


def test_finish_request_for_a_stop_string(make_scheduler, make_request, run_step):
    scheduler = make_scheduler()
    request = make_request("a", 6, stop=("END",))
    scheduler.add_request(request)
    run_step(scheduler)
    assert scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED, "END")
    assert request.status is RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == "END"
    assert scheduler.get_request("a") is None
    assert scheduler.block_manager.num_free_blocks == 16


def test_queue_full_at_max_waiting(make_scheduler, make_request):
    scheduler = make_scheduler(max_waiting=2)
    scheduler.add_request(make_request("a", 4))
    scheduler.add_request(make_request("b", 4))
    with pytest.raises(QueueFull, match="2 requests"):
        scheduler.add_request(make_request("c", 4))
    assert scheduler.num_waiting == 2


def test_add_request_rejects_what_can_never_run(make_scheduler, make_request):
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=32)
    with pytest.raises(InvalidArgument, match="exceeds max_model_len 32") as info:
        scheduler.add_request(make_request("long", 30, max_tokens=3))
    assert info.value.field == "max_tokens"
    with pytest.raises(InvalidArgument, match="needs 5 KV blocks"):
        scheduler.add_request(make_request("big", 16, max_tokens=2))
    scheduler.add_request(make_request("fits", 16, max_tokens=1))
    with pytest.raises(InvalidArgument, match="already in flight"):
        scheduler.add_request(make_request("fits", 4))


LENGTH = RequestStatus.FINISHED_LENGTH


def _always(token):
    return lambda request, position: token


@pytest.mark.parametrize(
    "params, sampled, status, stop_reason, num_outputs",
    [
        ({"eos": (2,)}, 2, RequestStatus.FINISHED_STOPPED, 2, 1),
        ({"eos": (2,), "ignore_eos": True, "max_tokens": 3}, 2, LENGTH, None, 3),
        ({"stop_token_ids": (7,)}, 7, RequestStatus.FINISHED_STOPPED, 7, 1),
        ({"max_tokens": 4}, 9, RequestStatus.FINISHED_LENGTH, None, 4),
    ],
)
def test_stop_conditions(
    make_scheduler, make_request, run_step, params, sampled, status, stop_reason, num_outputs
):
    scheduler = make_scheduler()
    request = make_request("a", 5, **params)
    scheduler.add_request(request)
    streamed = []
    while scheduler.has_unfinished:
        _, results = run_step(scheduler, _always(sampled))
        streamed.extend(results)
    assert [r.new_token_ids for r in streamed] == [(sampled,)] * num_outputs
    assert [r.finished for r in streamed] == [False] * (num_outputs - 1) + [True]
    assert (streamed[-1].status, streamed[-1].stop_reason) == (status, stop_reason)
    assert request.output_token_ids == [sampled] * num_outputs
    assert scheduler.block_manager.num_free_blocks == 16


def test_cached_prompt_tokens_are_reported(make_scheduler, make_request, run_step):
    scheduler = make_scheduler(num_blocks=16, block_size=16)
    prompt = list(range(40))
    scheduler.add_request(make_request("a", prompt, max_tokens=1))
    run_step(scheduler)
    scheduler.add_request(make_request("b", prompt[:32] + [5] * 8, max_tokens=1))
    out, results = run_step(scheduler)
    assert _plan(out) == [("b", 8, True)]
    assert results[0].num_cached_tokens == 32


# -- randomized soak -----------------------------------------------------------------------------

EOS = 5
PREFIXES = [list(range(100 * k, 100 * k + 12)) for k in range(1, 4)]


def _soak_sample(request, position):
    """Deterministic per (request, position), so recomputation after preemption agrees."""
    if random.Random(f"{request.request_id}:{position}").random() < 0.06:
        return EOS
    return 1000 + position


def _soak_request(make_request, rng, index):
    prompt = list(rng.choice(PREFIXES))[: rng.randint(0, 12)]
    prompt += [rng.randint(10, 99) for _ in range(rng.randint(1, 14))]
    return make_request(
        f"r{index}", prompt, max_tokens=rng.randint(1, 20), eos=(EOS,), arrival_time=float(index)
    )


def test_randomized_soak_every_request_ends_exactly_once(make_scheduler, make_request, run_step):
    rng = random.Random(1234)
    scheduler = make_scheduler(
        num_blocks=12, block_size=4, max_num_seqs=5, max_num_batched_tokens=20,
        long_prefill_token_threshold=9, max_waiting=8, max_model_len=64,
    )
    pending = [_soak_request(make_request, rng, i) for i in range(200)]
    requests = {r.request_id: r for r in pending}
    streamed: dict[str, list[int]] = {rid: [] for rid in requests}
    ended: dict[str, list[RequestStatus]] = {rid: [] for rid in requests}

    for _ in range(5000):
        while pending and rng.random() < 0.7:
            try:
                scheduler.add_request(pending[0])
            except QueueFull:
                break
            pending.pop(0)
        if scheduler.has_unfinished and rng.random() < 0.05:
            victim = rng.choice(list(scheduler.waiting) + scheduler.running)
            assert scheduler.abort(victim.request_id)
            ended[victim.request_id].append(RequestStatus.FINISHED_ABORTED)
        _, results = run_step(scheduler, _soak_sample)
        for result in results:
            streamed[result.request_id].extend(result.new_token_ids)
            if result.finished:
                ended[result.request_id].append(result.status)
        if not pending and not scheduler.has_unfinished:
            break

    assert not pending and not scheduler.has_unfinished
    assert all(len(statuses) == 1 for statuses in ended.values())
    for rid, request in requests.items():
        assert streamed[rid] == request.output_token_ids
        expected = [_soak_sample(request, request.num_prompt_tokens + k)
                    for k in range(request.num_output_tokens)]
        assert request.output_token_ids == expected
        if request.status is RequestStatus.FINISHED_LENGTH:
            assert request.num_output_tokens == request.sampling_params.max_tokens
        elif request.status is RequestStatus.FINISHED_STOPPED:
            assert request.output_token_ids[-1] == EOS
    statuses = [s[0] for s in ended.values()]
    assert statuses.count(RequestStatus.FINISHED_ABORTED) > 5
    assert sum(r.num_preemptions for r in requests.values()) > 0
    assert scheduler.block_manager.stats.num_hits > 0
    assert scheduler.block_manager.num_free_blocks == 12
    scheduler.check_integrity()
