"""The "triton" attention backend: KV write + paged attention kernels behind the engine's
`AttentionBackend` protocol (see services/worker/model/attention.py).

Importing this module registers the backend for CUDA (priority 20, above "torch" and "cpu"), so
`select_backend(cuda_device, dtype)` picks it; `get_backend("triton")` builds it by name. It runs
on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests). Steps without a KV cache
(reference checks, one-shot scoring) go to the torch backend: the kernels read K/V from the cache.

The kernels take the step layout as device tensors. `TritonAttentionMetadata` carries them; a
runner on CUDA should build that once per step (and a CUDA-graph capture must, with static
tensors). Given plain `AttentionMetadata`, the backend converts the host lists itself, once per
step (the conversion is shared by all layers).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch

from services.worker.model.attention import (
    AttentionMetadata,
    get_backend,
    register_backend,
)

from .kv_write import kv_write_triton
from .paged_attention import paged_attention_triton


@dataclass
class TritonAttentionMetadata(AttentionMetadata):
    """AttentionMetadata plus the device tensors the kernels read.

    query_start_loc_t: [B + 1] int32, the host list on the device.
    seq_lens_t: [B] int32, likewise.
    max_query_len: the step's longest query chunk (host int; sizes the kernel grid; 1 for a
        decode-only step, which is what a CUDA graph captures).
    """

    query_start_loc_t: torch.Tensor | None = None
    seq_lens_t: torch.Tensor | None = None
    max_query_len: int = 0

    @classmethod
    def from_metadata(cls, meta: AttentionMetadata,
                      device: torch.device) -> "TritonAttentionMetadata":
        qsl = meta.query_start_loc
        base = {f.name: getattr(meta, f.name) for f in dataclasses.fields(AttentionMetadata)}
        return cls(
            **base,
            query_start_loc_t=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens_t=torch.tensor(meta.seq_lens, dtype=torch.int32, device=device),
            max_query_len=max((qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)), default=0),
        )


# The last plain metadata seen and its device form: every layer of one step shares it.
_converted: tuple[weakref.ref, TritonAttentionMetadata] | None = None


def _device_metadata(meta: AttentionMetadata, device: torch.device) -> TritonAttentionMetadata:
    global _converted
    if isinstance(meta, TritonAttentionMetadata) and meta.query_start_loc_t is not None:
        return meta
    if _converted is not None and _converted[0]() is meta:
        return _converted[1]
    tm = TritonAttentionMetadata.from_metadata(meta, device)
    _converted = (weakref.ref(meta), tm)
    return tm


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)


@register_backend("triton", priority=20, supports=_supports)
class TritonAttention:
    """Writes the step's K/V with the kv_write kernel, then runs one paged-attention launch."""

    def __init__(self) -> None:
        self._no_cache = get_backend("torch")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 kv_cache: torch.Tensor | None, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache: [2, NB, BS, Hkv, D] -> [T, Hq, D]."""
        if kv_cache is None:
            return self._no_cache(q, k, v, scale, kv_cache, meta)
        tm = _device_metadata(meta, q.device)
        kv_write_triton(kv_cache, k, v, tm.slot_mapping)
        return paged_attention_triton(q, kv_cache, tm.block_tables, tm.query_start_loc_t,
                                      tm.seq_lens_t, scale, tm.max_query_len)
