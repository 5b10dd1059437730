"""Int8Linear / Int4Linear against float references, on every CPU path (few rows: torch's packed
kernels with bf16 activations; many rows: dequantize + GEMM) and the tied-embedding lookup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.worker.kernels.int4_format import pack_int4, unpack_int4
from services.worker.quant.base import QuantizedEmbedding
from services.worker.quant.config import QuantConfig
from services.worker.quant.int4 import Int4Linear, quantize_int4
from services.worker.quant.int4_cpu import Int4CpuLayout
from services.worker.quant.int8 import Int8Linear, quantize_int8

ROWS = [1, 24, 200]  # packed kernel; int8's largest kernel batch; both formats' dense path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("rows", ROWS)
def test_int8_matches_its_dequantized_weight(rows):
    gen = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    lin = Int8Linear.from_float(w, b)
    x = torch.randn(rows, 64, generator=gen)
    want = F.linear(x, lin.dequantize(), b)
    # bf16 activations and outputs on the packed path: ~2^-9 relative per element.
    assert _rel(lin(x), want) < (5e-3 if rows <= lin.small_m else 1e-6)
    assert _rel(lin.dequantize(), w) < 1e-2  # int8 round-to-nearest of Gaussian rows


def test_int8_quantizer_bounds_and_zero_rows():
    w = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-127.0, 2.0]])
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(q[0], torch.zeros(2, dtype=torch.int8)) and s[0] == 0
    assert torch.allclose(q.float() * s[:, None], w, atol=s.max().item() / 2)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_matches_its_dequantized_weight(rows, group):
    gen = torch.Generator().manual_seed(rows * group)
    w = torch.randn(80, 256, generator=gen)
    lin = Int4Linear.from_float(w, group_size=group)
    assert lin.cpu_layout is not None and lin.qweight is None  # one copy of the codes on CPU
    x = torch.randn(rows, 256, generator=gen)
    want = F.linear(x, lin.dequantize())
    assert _rel(lin(x), want) < (5e-3 if rows <= lin.small_m else 1e-6)
    assert _rel(lin.dequantize(), w) < 0.12  # 4-bit min/max rounding of Gaussian groups


def test_int4_grid_weights_are_exact():
    """Weights already on an int4 grid (a dequantized GGUF Q4_1 tensor) survive re-quantizing."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=gen)
    codes[:, 0::32], codes[:, 1::32] = 0, 15  # each group spans its grid: min/max recover it
    scale = torch.rand(32, 2, generator=gen) + 0.1
    w = (codes.view(32, 2, 32) * scale[..., None]).view(32, 64) - 1.0
    got, s, z = quantize_int4(w, 32)
    assert torch.equal(got, codes.to(torch.uint8))
    torch.testing.assert_close((got.view(32, 2, 32) - 8.0) * s[..., None] + z[..., None],
                               w.view(32, 2, 32), atol=1e-5, rtol=1e-6)


def test_int4_odd_width_keeps_portable_format():
    lin = Int4Linear.from_float(torch.randn(40, 64))  # torch's CPU packing needs N % 16 == 0
    assert lin.packed is None and lin.qweight is not None
    x = torch.randn(1, 64)
    torch.testing.assert_close(lin(x), F.linear(x, lin.dequantize()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capability", ["AVX512", "AVX2", "DEFAULT"])
def test_cpu_layout_reads_rows(capability):
    layout = Int4CpuLayout(112, 64, capability)  # one full block and a partial one (AVX512)
    codes = torch.randint(0, 16, (112, 64), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    if capability == torch.backends.cpu.get_cpu_capability():
        assert layout.verify(packed, codes.to(torch.uint8))
    rows = torch.tensor([0, 17, 33, 63, 64, 111])
    assert layout.codes(packed, rows).shape == (6, 64)


def test_pack_round_trip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_embedding_rows_match_head(cls):
    head = cls.from_float(torch.randn(64, 96))
    emb = QuantizedEmbedding(head, torch.float32)
    ids = torch.tensor([[3, 0], [63, 3]])
    got = emb(ids)
    assert got.shape == (2, 2, 96)
    torch.testing.assert_close(got.view(4, 96), head.dequantize()[ids.view(-1)])


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="'int3'"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="48"):
        QuantConfig("int4", group_size=48)
    assert QuantConfig("int4").describe() == "int4 g32, head int8"
    assert QuantConfig.of(None).scheme == "none" and not QuantConfig.of("none").enabled
