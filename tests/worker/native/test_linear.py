"""The native float32 linear kernel: against F.linear, row-for-row batch invariance, packing."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.worker.model import cpu_linear
from services.worker.native import linear as nl


@pytest.fixture(autouse=True)
def _native():
    assert nl.available(), "the README requires a C compiler; the kernels must build here"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weights(n: int, k: int, bias: bool, seed: int = 0):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    return w, (torch.randn(n, generator=g) if bias else None)


@contextlib.contextmanager
def _threads(n: int):
    """Runs the body with n torch threads, restoring the old count after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("n", [1, 17, "nr", "nr+5", "3nr"])
@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(n, k, bias):
    nr = nl.panel_width()
    n = {"nr": nr, "nr+5": nr + 5, "3nr": 3 * nr}.get(n, n)
    w, b = _weights(n, k, bias)
    packed = nl.pack(w, b)
    for m in (1, 5, 13, 32):
        x = torch.randn(m, k, generator=_gen(m))
        torch.testing.assert_close(nl.linear(x, packed), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_panel_layout():
    """Panel p, row k holds W[p*NR : (p+1)*NR, k], zero-padded past N; bias likewise."""
    nr = nl.panel_width()
    n, k = nr + 3, 5
    w = torch.arange(n * k, dtype=torch.float32).view(n, k)
    b = torch.arange(n, dtype=torch.float32) + 0.5
    packed = nl.pack(w, b)
    assert packed.panels.shape == (2, k, nr)
    assert torch.equal(packed.panels[0], w[:nr].t())
    assert torch.equal(packed.panels[1, :, :3], w[nr:].t())
    assert torch.equal(packed.panels[1, :, 3:], torch.zeros(k, nr - 3))
    assert torch.equal(packed.bias[:n], b) and torch.equal(packed.bias[n:], torch.zeros(nr - 3))


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_are_batch_invariant(threads):
    """Each row's output is bitwise the same alone and at every position of any batch size:
    the property the engine's batch-invariance test relies on (tiles and thread splits vary
    with the batch; the per-element FMA chain must not)."""
    w, b = _weights(3 * nl.panel_width() + 7, 576, bias=True, seed=1)
    packed = nl.pack(w, b)
    x = torch.randn(40, 576, generator=_gen(2))
    with _threads(threads):
        solo = torch.cat([nl.linear(x[i:i + 1], packed) for i in range(40)])
        for m in (2, 7, 8, 9, 17, 32, 33, 40):
            got = nl.linear(x[:m], packed)
            mismatched = [i for i in range(m) if not torch.equal(got[i], solo[i])]
            assert not mismatched, f"batch of {m}: rows {mismatched} differ from their solo run"
        # A row in the middle of a batch, in another position.
        assert torch.equal(nl.linear(x[[5, 3, 5]], packed)[2], solo[5])


def test_thread_count_does_not_change_results():
    w, _ = _weights(200, 300, bias=False)
    packed = nl.pack(w)
    x = torch.randn(19, 300, generator=_gen(3))
    with _threads(1):
        one = nl.linear(x, packed)
    with _threads(2):
        two = nl.linear(x, packed)
    assert torch.equal(one, two)


def test_leading_dims_and_non_contiguous_input():
    w, b = _weights(50, 32, bias=True)
    packed = nl.pack(w, b)
    x = torch.randn(3, 4, 64, generator=_gen(4))[..., ::2]  # [3, 4, 32], stride 2
    out = nl.linear(x, packed)
    assert out.shape == (3, 4, 50)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert nl.linear(torch.empty(0, 32), packed).shape == (0, 50)


def test_bad_inputs_are_refused():
    w, _ = _weights(8, 4, bias=False)
    packed = nl.pack(w)
    with pytest.raises(AssertionError, match="features"):
        nl.linear(torch.randn(2, 5), packed)
    with pytest.raises(AssertionError):
        nl.linear(torch.randn(2, 4, dtype=torch.bfloat16), packed)
    with pytest.raises(AssertionError):
        nl.pack(w.to(torch.float64))
    with pytest.raises(AssertionError):
        nl.pack(w, torch.zeros(3))


def test_pack_linears_uses_the_native_kernel():
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8, bias=False))
    x = torch.randn(5, 16, generator=_gen(5))
    with torch.inference_mode():
        want = model(x)
        assert cpu_linear.pack_linears(model) == 2
        assert [type(m) for m in model] == [cpu_linear.NativeLinear, nn.ReLU,
                                            cpu_linear.NativeLinear]
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_onednn_fallback_matches():
    lin = nn.Linear(40, 30)
    x = torch.randn(6, 40, generator=_gen(6))
    with torch.inference_mode():
        torch.testing.assert_close(cpu_linear.OneDnnLinear(lin)(x), lin(x), rtol=1e-5, atol=1e-5)
