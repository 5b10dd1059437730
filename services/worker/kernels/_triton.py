"""The one place that imports triton, guarded: CPU code paths never need it importable.

Kernel modules do `from ._triton import triton, tl` at import time. Without triton, `triton.jit`
still decorates (into a stub that raises when launched) and `tl.constexpr` still annotates, so
each kernel file's torch reference stays usable on a machine without triton.

`TRITON_INTERPRET=1` must be set before the first `import triton` (the jit decorator picks the
interpreter at decoration time); tests set it in tests/conftest.py.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the kernels' torch references still work.
    HAVE_TRITON = False

    class _MissingTriton:
        """Stands in for `triton` / `triton.language` so kernel modules import without triton."""

        constexpr = Any

        def jit(self, fn: Callable | None = None, **_: Any) -> Callable:
            def stub(f: Callable) -> Callable:
                def launch(*a: Any, **k: Any) -> None:
                    raise RuntimeError(f"triton is not installed; cannot launch {f.__name__}")
                return _Launchable(launch)
            return stub(fn) if fn is not None else stub

        def cdiv(self, a: int, b: int) -> int:
            return -(-a // b)

        def next_power_of_2(self, n: int) -> int:
            return 1 << max(0, (n - 1).bit_length())

    class _Launchable:
        def __init__(self, launch: Callable) -> None:
            self._launch = launch

        def __getitem__(self, grid: Any) -> Callable:
            return self._launch

    triton = tl = _MissingTriton()  # type: ignore[assignment]


def interpreting() -> bool:
    """True when kernels run in triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return HAVE_TRITON and bool(triton.knobs.runtime.interpret)


def use_triton(t: torch.Tensor) -> bool:
    """The dispatch rule of every `op(...)` in this package: Triton on CUDA, torch elsewhere.

    Deliberately not "wherever the interpreter could run it": tests set TRITON_INTERPRET=1 for
    the whole process, and a CPU engine must not slow to interpreter speed there.
    """
    return HAVE_TRITON and t.is_cuda


def require_launchable(t: torch.Tensor) -> None:
    """A `*_triton` wrapper runs on CUDA, or on CPU tensors under the interpreter (tests)."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install -e '.[kernels]')")
    if not (t.is_cuda or interpreting()):
        raise RuntimeError(f"Triton kernels need CUDA tensors (got {t.device}) or "
                           "TRITON_INTERPRET=1 set before triton is imported")


def upcast_math(dtype: torch.dtype) -> bool:
    """Kernels do their dots in float32 when True. The interpreter computes bf16 on raw bits
    (wrong results), and float32 inputs would otherwise run as tf32 on the GPU."""
    return interpreting() or dtype == torch.float32


def check(cond: bool, message: str) -> None:
    """Wrapper-side layout assertion that survives `python -O` (a bad stride is silent memory
    corruption on the GPU, so these are not plain asserts)."""
    if not cond:
        raise ValueError(message)
