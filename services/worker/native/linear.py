"""Float32 CPU linear layer with weights packed for streaming (linear.c via ctypes).

`pack(weight, bias)` lays a [N, K] weight out once as contiguous panels; `linear(x, packed)`
computes x W^T + b with every output row bitwise independent of the batch it is in. See
linear.c for why it beats oneDNN at decode batch sizes and how the prefetch works.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from .build import Probe, load

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "linear_panel_width": ([], _I64),
    "linear_pack_f32": ([_PTR] * 4 + [_I64] * 2, None),
    "linear_f32": ([_PTR] * 4 + [_I64] * 3 + [_INT], None),
}
_fns: dict[str, ctypes._CFuncPtr] = {}


def _load() -> None:
    lib = load("linear")
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
        _fns[name] = fn


available = Probe("native linear", _load)
"""available() -> bool: whether the library is built and loadable here (tried once per process)."""


def panel_width() -> int:
    """Output columns per packed panel on this machine (48 with AVX-512, 16 with AVX2)."""
    return _fns["linear_panel_width"]()


@dataclass(frozen=True)
class PackedWeight:
    """A [N, K] weight (and optional [N] bias) in the kernel's panel layout."""

    panels: torch.Tensor
    """[ceil(N / NR), K, NR] float32; columns past N are zero."""
    bias: torch.Tensor | None
    """[ceil(N / NR) * NR] float32, zero past N; None without a bias."""
    out_features: int
    in_features: int


def pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedWeight:
    """Packs weight [N, K] (and bias [N]) float32 CPU tensors; the inputs are not kept."""
    assert weight.dim() == 2 and weight.dtype == torch.float32 and weight.device.type == "cpu", (
        weight.shape, weight.dtype, weight.device)
    n, k = weight.shape
    assert n >= 1 and k >= 1, f"empty weight {tuple(weight.shape)}"
    assert bias is None or (bias.shape == (n,) and bias.dtype == torch.float32), (
        None if bias is None else (bias.shape, bias.dtype))
    weight = weight.detach().contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    nr = panel_width()
    num_panels = -(-n // nr)
    panels = torch.empty(num_panels, k, nr, dtype=torch.float32)
    packed_bias = None if bias is None else torch.empty(num_panels * nr, dtype=torch.float32)
    _fns["linear_pack_f32"](panels.data_ptr(),
                            None if packed_bias is None else packed_bias.data_ptr(),
                            weight.data_ptr(), None if bias is None else bias.data_ptr(), n, k)
    return PackedWeight(panels, packed_bias, n, k)


def linear(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """x [..., K] float32 CPU -> [..., N]: x W^T + b."""
    assert x.dtype == torch.float32 and x.device.type == "cpu", (x.dtype, x.device)
    assert x.shape[-1] == w.in_features, f"input has {x.shape[-1]} features, weight {w.in_features}"
    x = x.contiguous()
    rows = x.numel() // w.in_features
    y = x.new_empty(*x.shape[:-1], w.out_features)
    _fns["linear_f32"](y.data_ptr(), x.data_ptr(), w.panels.data_ptr(),
                       None if w.bias is None else w.bias.data_ptr(), rows, w.out_features,
                       w.in_features, torch.get_num_threads())
    return y
