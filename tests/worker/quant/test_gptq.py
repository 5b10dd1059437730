"""GPTQ rounding: never worse than round-to-nearest on the calibration inputs, exact RTN when the
inputs are uncorrelated, and stacked layers give the same result as one at a time."""

from __future__ import annotations

import torch

from services.worker.quant.gptq import gptq_int8
from services.worker.quant.int8 import quantize_int8


def _inputs(gen: torch.Generator, k: int) -> torch.Tensor:
    # Low-rank correlated inputs with uneven channel scales, like a transformer's activations.
    x = torch.randn(1024, 8, generator=gen) @ torch.randn(8, k, generator=gen)
    return (x + 0.1 * torch.randn(1024, k, generator=gen)) * torch.rand(k, generator=gen) * 3


def test_lowers_output_error_on_calibration_inputs():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 96, generator=gen), _inputs(gen, 96)
    q, s = gptq_int8(w, x.t() @ x)
    q_rtn, s_rtn = quantize_int8(w)
    assert torch.equal(s, s_rtn)  # same scales: only the rounding differs
    err = (x @ (q.float() * s[:, None] - w).t()).norm()
    err_rtn = (x @ (q_rtn.float() * s_rtn[:, None] - w).t()).norm()
    assert err < 0.5 * err_rtn


def test_uncorrelated_inputs_round_to_nearest():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    q, _ = gptq_int8(w, torch.eye(32) * 5.0)
    assert torch.equal(q, quantize_int8(w)[0])


def test_stacked_layers_match_single():
    gen = torch.Generator().manual_seed(2)
    ws = torch.randn(3, 32, 64, generator=gen)
    hs = torch.stack([(x.t() @ x) for x in (_inputs(gen, 64) for _ in range(3))])
    q, s = gptq_int8(ws, hs)
    for i in range(3):
        qi, si = gptq_int8(ws[i], hs[i])
        assert torch.equal(q[i], qi) and torch.equal(s[i], si)
