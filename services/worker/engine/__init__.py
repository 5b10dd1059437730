"""Switchyard's engine core: requests, block manager and scheduler, in pure Python.

Nothing here imports torch or numpy; plain dataclasses cross every boundary so the core is unit
tested on any machine with hand-built model outputs. The model runner (tensors) and the engine
loop (`schedule -> execute -> update`) live beside it and depend on it, never the reverse.
"""

from services.worker.engine.block_manager import BlockHash, BlockManager, PrefixCacheStats
from services.worker.engine.config import CacheConfig, SchedulerConfig, num_blocks_for_budget
from services.worker.engine.errors import InvalidArgument, QueueFull
from services.worker.engine.outputs import (
    ModelOutput,
    RequestOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from services.worker.engine.request import Request, RequestStatus
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.scheduler import Scheduler

__all__ = [
    "BlockHash",
    "BlockManager",
    "CacheConfig",
    "InvalidArgument",
    "ModelOutput",
    "PrefixCacheStats",
    "QueueFull",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "num_blocks_for_budget",
]
