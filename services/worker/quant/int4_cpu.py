"""Reading codes back out of torch's CPU int4pack layout (`_convert_weight_to_int4pack_for_cpu`),
so a CPU Int4Linear keeps one copy of its codes, not the portable one beside the packed one.

The layout depends on the CPU's vector width (aten/src/ATen/native/cpu/int4mm_kernel.cpp): rows
go in blocks of BLOCK_N (64 with AVX512, else 32); block b holds K groups of BLOCK_N / 2 bytes.
In a full AVX512 block, byte 16 * h + d (d < 16) holds row 16 * h + d in its low nibble and row
16 * h + d + 32 in its high one; a full AVX2 block, byte d holds rows d and d + 16; partial
blocks and plain builds hold rows 2j, 2j + 1 in byte j. Each row n is then read as
flat[base[n] + k * stride[n]] >> shift[n]. `Int4CpuLayout.verify` checks this against the codes
it was packed from; a mismatch (a torch that changed the layout) keeps the portable copy.
"""

from __future__ import annotations

import torch

_BLOCK_N = {"AVX512": 64}
# Full-block byte order: row r of a block sits at [nibble, half, d] with r = ...
_FULL_HALVES = {"AVX512": 2, "AVX2": 1}  # 16-byte runs per k in a full block


class Int4CpuLayout:
    """Per-row read pattern of a packed [N, K] int4 matrix: base, stride (bytes), shift (bits)."""

    def __init__(self, n: int, k: int, capability: str | None = None) -> None:
        cap = capability or torch.backends.cpu.get_cpu_capability()
        block = _BLOCK_N.get(cap, 32)
        rows = torch.arange(n)
        b, r = rows // block, rows % block
        size = torch.clamp(n - b * block, max=block)  # rows in each row's block
        full = size == block
        if cap == "AVX512":
            col = torch.where(full, r % 16 + 16 * ((r // 16) % 2), r // 2)
            high = torch.where(full, r >= 32, r % 2 == 1)
        elif cap == "AVX2":
            col = torch.where(full, r % 16, r // 2)
            high = torch.where(full, r >= 16, r % 2 == 1)
        else:
            col, high = r // 2, r % 2 == 1
        self.n, self.k, self.cap, self.block = n, k, cap, block
        self.base = b * block * k // 2 + col  # [N] byte offset of (row, k = 0)
        self.stride = size // 2  # [N] bytes between k and k + 1
        self.shift = high.to(torch.uint8) * 4  # [N]

    def codes(self, packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 codes [len(rows), K] (all rows when None) from the packed tensor."""
        if rows is None and self.cap in _FULL_HALVES:
            return self._all_codes(packed)
        return self._gather(packed, slice(None) if rows is None else rows)

    def _all_codes(self, packed: torch.Tensor) -> torch.Tensor:
        # Full blocks through views (~10x faster than the gather), the tail by gather.
        halves, full = _FULL_HALVES[self.cap], self.n // self.block
        flat = packed.reshape(-1)
        p = flat[: full * self.block * self.k // 2].view(full, self.k, halves, 16)
        # [blocks, K, half, d] -> [blocks, nibble, half, d, K]: row = 16*(halves*nibble+half)+d
        codes = torch.stack((p & 0xF, p >> 4), dim=2).permute(0, 2, 3, 4, 1)
        codes = codes.reshape(full * self.block, self.k)
        if full * self.block == self.n:
            return codes
        tail = self._gather(packed, slice(full * self.block, None))
        return torch.cat((codes, tail))

    def _gather(self, packed: torch.Tensor, sel) -> torch.Tensor:
        base, stride, shift = self.base[sel], self.stride[sel], self.shift[sel]
        idx = base[:, None] + torch.arange(self.k)[None, :] * stride[:, None]  # [R, K]
        return (packed.reshape(-1)[idx] >> shift[:, None]) & 0xF

    def verify(self, packed: torch.Tensor, codes: torch.Tensor) -> bool:
        return torch.equal(self.codes(packed), codes)
