"""The "cpu" attention backend: the torch backend with decode rows served by a native kernel.

Decode attention is memory-bound: each step reads every running sequence's K/V once per layer.
The torch path gathers those K/V into a contiguous copy (index_select) and runs SDPA over it, so
each byte crosses memory three times; `services/worker/native/paged_attention.c` reads the blocks
in place through the block table. Prefill chunks keep the torch path (they are compute-bound and
SDPA's flash kernel serves them well). Float32 only; `select_backend` picks this backend on CPU
when the kernel builds here, else "torch".
"""

from __future__ import annotations

import torch

from services.worker.native import paged_attention as native

from .attention import AttentionMetadata, TorchAttention, register_backend


def _supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and native.available()


@register_backend("cpu", priority=10, supports=_supports)
class CpuAttention(TorchAttention):
    """TorchAttention whose decode rows run in one native paged-attention call per layer."""

    @staticmethod
    def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        # __call__ range-checked slot_mapping once for the step
        native.write_kv(kv_cache, k, v, slot_mapping, check=False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 kv_cache: torch.Tensor | None, meta: AttentionMetadata) -> torch.Tensor:
        if kv_cache is not None and not meta.slots_checked:
            _, nb, bs = kv_cache.shape[:3]
            native.check_slots(meta.slot_mapping, nb * bs)
            meta.slots_checked = True
        return super().__call__(q, k, v, scale, kv_cache, meta)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float, out: torch.Tensor) -> None:
        dr = meta.decode_rows
        if dr.all_rows:  # a decode-only step: rows are the batch, in order; no gather/scatter
            native.paged_decode_attention(q.contiguous(), kv_cache[0], kv_cache[1],
                                          dr.block_tables, dr.seq_lens, scale, out=out)
            return
        qd = q.index_select(0, dr.token_idx)  # [Bd, Hq, D], contiguous
        res = native.paged_decode_attention(qd, kv_cache[0], kv_cache[1], dr.block_tables,
                                            dr.seq_lens, scale)
        out.index_copy_(0, dr.token_idx, res)
