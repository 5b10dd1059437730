"""The worker's gRPC servicer: a thin adapter from WorkerService to the AsyncEngine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from switchyard.common.v1 import common_pb2
from switchyard.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common.grpc_errors import maps_errors, register_status
from services.worker import convert
from services.worker.config import WorkerConfig
from services.worker.engine.async_engine import AsyncEngine
from services.worker.engine.errors import EngineDead, InvalidArgument, QueueFull
from services.worker.observe import Observability

logger = logging.getLogger(__name__)

register_status(InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT)
register_status(QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED)
register_status(EngineDead, grpc.StatusCode.UNAVAILABLE)

TIERS = {"small": common_pb2.TIER_SMALL, "quantized": common_pb2.TIER_QUANTIZED,
         "large": common_pb2.TIER_LARGE}


class NotServing(RuntimeError):
    """The worker is still loading or is draining (maps to UNAVAILABLE)."""


register_status(NotServing, grpc.StatusCode.UNAVAILABLE)


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Starts before the model is loaded (so probes get answers); `attach` makes it serve."""

    def __init__(self, config: WorkerConfig, observability: Observability | None = None) -> None:
        self.config = config
        self.engine: AsyncEngine | None = None
        self.draining = False
        self._in_flight: set[str] = set()
        """request_ids of the Generate calls being served. The engine keys its streams by
        request_id: a second call reusing a live id would take over the first one's stream
        and, on its rejection, abort it (the first caller then waits forever)."""
        if observability is None:
            from opentelemetry.trace import NoOpTracer
            observability = Observability(NoOpTracer(), None, config.tier, config.worker_id)
        self.observe = observability

    def attach(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.engine.tokenizer
        self.model_id = engine.engine.loaded.model_id
        self.quantization = engine.engine.loaded.quantization.scheme

    @property
    def serving(self) -> bool:
        return self.engine is not None and not self.draining

    def _require_serving(self) -> AsyncEngine:
        if self.engine is None:
            raise NotServing("worker is loading its model; retry shortly or on another replica")
        if self.draining:
            raise NotServing("worker is draining; retry on another replica")
        return self.engine

    @maps_errors
    async def Generate(self, request, context):
        self._require_serving()
        with self.observe.request(request, context, self.model_id) as obs:
            convert.validate_request(request)
            rid = request.request_id
            if rid in self._in_flight:
                raise InvalidArgument("request_id", "is already in flight on this worker")
            params = convert.sampling_params(request)
            prompt_ids = self.tokenizer.encode(convert.prompt_text(request, self.tokenizer))
            self._in_flight.add(rid)  # no await since the check: nobody else got in between
            try:
                # aclosing: leaving this loop at a yield (the RPC ended) must close the engine
                # stream at once, which aborts the request and frees its KV blocks.
                events = self.engine.generate(rid, prompt_ids, params)
                async with contextlib.aclosing(events):
                    async for event in events:
                        obs.on_event(event)
                        if event.text or event.token_ids:
                            yield convert.chunk(event, self.tokenizer)
                        if event.completion is not None:
                            final = convert.complete(event.completion, self.model_id,
                                                     self.quantization)
                            obs.on_complete(event.completion, final)
                            yield final
            finally:
                self._in_flight.discard(rid)

    @maps_errors
    async def Abort(self, request, context):
        found = self.engine is not None and self.engine.abort(request.request_id)
        return worker_pb2.AbortResponse(found=found)

    def load(self) -> worker_pb2.Load:
        if self.engine is None:
            return worker_pb2.Load(worker_id=self.config.worker_id, tier=TIERS[self.config.tier],
                                   serving=False, timestamp_unix_ms=time.time() * 1000.0)
        eng = self.engine.engine
        bm, sched = eng.block_manager, eng.scheduler
        prefix = bm.enable_prefix_caching
        return worker_pb2.Load(
            worker_id=self.config.worker_id, model_id=self.model_id,
            tier=TIERS[self.config.tier], num_running=sched.num_running,
            num_waiting=sched.num_waiting, max_waiting=sched.config.max_waiting,
            max_running=sched.config.max_num_seqs, kv_blocks_free=bm.num_free_blocks,
            kv_blocks_total=bm.num_blocks, kv_block_size=bm.block_size,
            max_context_tokens=sched.config.max_model_len, serving=self.serving,
            prefix_cache_hit_tokens=bm.stats.num_hits if prefix else None,
            prefix_cache_query_tokens=bm.stats.num_queries if prefix else None,
            timestamp_unix_ms=time.time() * 1000.0,
            quantization=convert.QUANTIZATIONS[self.quantization],
        )

    @maps_errors
    async def GetLoad(self, request, context):
        return self.load()

    @maps_errors
    async def WatchLoad(self, request, context):
        interval = max(request.interval_ms or self.config.load_interval_ms,
                       self.config.min_load_interval_ms) / 1000.0
        while True:
            yield self.load()
            await asyncio.sleep(interval)
