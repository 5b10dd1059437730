"""Kernel tests run every Triton kernel in triton's CPU interpreter against its torch reference.

TRITON_INTERPRET must be set before triton is first imported (the jit decorator reads it then);
tests/conftest.py sets it for the whole session, and this repeats it for runs that start here.
Nothing else in the suite imports triton, and the engine's dispatch only picks Triton for CUDA
tensors, so the setting changes no other test.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it; neither torch nor triton declares it


def tolerance(dtype: torch.dtype) -> dict:
    """assert_close tolerances per dtype. bf16 allows ~2 ulp: the interpreter truncates on
    float32 -> bf16 stores where torch rounds to nearest."""
    return {
        torch.float32: dict(atol=2e-5, rtol=1e-5),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]


def random_block_tables(seq_lens: list[int], block_size: int, num_blocks: int,
                        gen: torch.Generator) -> torch.Tensor:
    """Disjoint, shuffled block ids per sequence, padded with 0: [B, max_blocks] int64."""
    need = [-(-n // block_size) for n in seq_lens]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need)
    rows, i = [], 0
    for n in need:
        rows.append(perm[i:i + n] + [0] * (width - n))
        i += n
    return torch.tensor(rows, dtype=torch.int64)
