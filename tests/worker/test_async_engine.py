"""AsyncEngine: cancellation at every point of a request's life, and failure of the loop."""

from __future__ import annotations

import asyncio

import pytest

from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.config import CacheConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.errors import EngineDead
from services.worker.engine.sampling_params import SamplingParams
from services.worker.model.loader import load_model

PARAMS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


def _engine(loaded) -> LLMEngine:
    return LLMEngine(loaded, CacheConfig(num_blocks=64), SchedulerConfig(max_model_len=512))


async def _consume(aengine, rid, stop_after=None):
    n = 0
    async for event in aengine.generate(rid, [5, 6, 7, 8], PARAMS):
        n += len(event.token_ids)
        if stop_after is not None and n >= stop_after:
            return n
    return n


def test_cancel_at_any_point_keeps_the_engine_alive(loaded):
    """Tasks cancelled before, during and after admission: no lost abort, no dead loop."""
    async def main():
        aengine = AsyncEngine(lambda: _engine(loaded))
        aengine.start()
        await aengine.wait_ready()
        for i in range(60):
            task = asyncio.create_task(_consume(aengine, f"c{i}"))
            for _ in range(i % 4):  # cancel after 0..3 loop turns: queued, adding, running
                await asyncio.sleep(0)
            task.cancel()
        assert await _consume(aengine, "after") == 40  # still serving
        for _ in range(200):
            if aengine.engine.block_manager.num_free_blocks == 64 and not aengine.engine.has_unfinished:
                break
            await asyncio.sleep(0.01)
        assert aengine.engine.block_manager.num_free_blocks == 64
        assert not aengine.engine.has_unfinished and aengine.num_in_flight == 0
        aengine.shutdown()

    asyncio.run(main())


def test_a_failed_step_fails_streams_and_later_requests(loaded, monkeypatch):
    async def main():
        aengine = AsyncEngine(lambda: _engine(loaded))
        aengine.start()
        engine = await aengine.wait_ready()

        def broken_step():
            raise RuntimeError("simulated kernel failure")

        monkeypatch.setattr(engine, "step", broken_step)
        with pytest.raises(EngineDead, match="simulated kernel failure"):
            await asyncio.wait_for(_consume(aengine, "a"), 10)
        with pytest.raises(EngineDead):
            await asyncio.wait_for(_consume(aengine, "b"), 10)
        aengine.shutdown()

    asyncio.run(main())
