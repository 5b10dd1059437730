"""What the int8 and int4 linears share: row-wise loading, bias, the forward dispatch.

Both formats are row-local (a scale per output channel, or per group within a row), so a fused
projection (qkv, gate_up) loads shard by shard: `load_rows(offset, source)` quantizes or decodes
just those rows. `finalize()` then builds the device's compute form (torch's CPU layouts).

forward(x) picks, by device and rows:
  CUDA               -> the Triton kernel (dequantizes inside the kernel);
  CPU, <= small_m    -> torch's packed weight-only kernel, activations in bf16 (the fast path of
                        `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`; with float32
                        activations both run 5-25x slower);
  CPU, more rows     -> dequantize to x's dtype and F.linear: the weight-only kernels' time grows
                        with the rows (at 512 rows 2-3x float32's), one dequantize per call does
                        not. `small_m` is each format's crossover, measured with
                        `bench/quant_speed.py --rows` (1 thread, SmolLM2 shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantLinear(nn.Module):
    """y = x W^T + b with W held quantized; subclasses define the format."""

    scheme = ""
    small_m = 16
    """Rows up to which CPU calls use the packed weight-only kernel (per format; see above)."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self._finalized = False

    # ---- loading
    def load_rows(self, offset: int, source) -> None:
        """Fills output rows [offset, offset + rows) from a float [rows, K] tensor or a GGUF block
        source (see gguf_blocks.py)."""
        raise NotImplementedError

    @torch.no_grad()
    def load_bias(self, offset: int, bias: torch.Tensor) -> None:
        if self.bias is None:
            raise KeyError(f"{type(self).__name__} was built without a bias")
        self.bias[offset:offset + bias.shape[0]] = bias.to(self.bias)

    def finalize(self) -> None:
        """Builds the compute form for the weights' device once all rows are loaded."""
        self._finalized = True

    # ---- compute
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K]."""
        return self.dequantize_rows(None, dtype)

    def dequantize_rows(self, rows: torch.Tensor | None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float rows of W (all when None): [len(rows), K]. Serves a tied embedding's lookup."""
        raise NotImplementedError

    def _cuda_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _cpu_small_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N]."""
        assert self._finalized, "QuantLinear used before finalize()"
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            y = self._cuda_matmul(x2.contiguous())
        elif x2.shape[0] <= self.small_m:
            y = self._cpu_small_matmul(x2.contiguous()).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantize(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}")


class QuantizedEmbedding(nn.Module):
    """Token embedding read from a tied LM head's quantized matrix (one copy serves both)."""

    def __init__(self, head: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = head
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> [T, hidden] in the model's dtype."""
        rows = self.head.dequantize_rows(input_ids.reshape(-1), self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)
