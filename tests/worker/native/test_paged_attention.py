"""The native paged-attention kernel (decode and prefill rows) against its torch reference, on
every code path this machine has, and backend choice."""

from __future__ import annotations

import ctypes

import pytest
import torch

from services.worker.model import cpu_attention  # noqa: F401  (registers "cpu")
from services.worker.model.attention import select_backend
from services.worker.native import build
from services.worker.native import paged_attention as pa


def _case(gen, b, hq, hkv, d, bs, max_blocks, num_blocks=64):
    kc = torch.randn(num_blocks, bs, hkv, d, generator=gen)
    vc = torch.randn(num_blocks, bs, hkv, d, generator=gen)
    q = torch.randn(b, hq, d, generator=gen)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks]
                          for _ in range(b)])
    # lengths cover: one token, exactly full blocks, partial last blocks, the maximum
    lens = torch.randint(1, max_blocks * bs + 1, (b,), generator=gen)
    lens[0] = 1
    if b > 1:
        lens[1] = max_blocks * bs
    if b > 2:
        lens[2] = bs
    return q, kc, vc, tables, lens


def _paths_here() -> list[str]:
    """The code paths the kernel built here can take (each cap tried on a shape all paths take)."""
    before = pa.set_max_isa("avx512")
    try:
        reached = []
        for cap in pa.ISA_NAMES:
            pa.set_max_isa(cap)
            reached.append(pa.isa(64, 16))
        return sorted(set(reached), key=pa.ISA_NAMES.index)
    finally:
        pa.set_max_isa(before)


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def path(request):
    """Caps the kernel at one code path (skipped where the CPU lacks it)."""
    if request.param not in _paths_here():
        pytest.skip(f"no {request.param} on this CPU")
    before = pa.set_max_isa(request.param)
    yield request.param
    pa.set_max_isa(before)


def test_kernel_builds_here():
    # The README requires a C compiler; without the kernel, decode falls back to a 3-5x slower
    # path, so a machine that cannot build it should fail loudly here rather than run slowly.
    assert pa.available()
    assert select_backend(torch.device("cpu"), torch.float32) == "cpu"
    assert select_backend(torch.device("cpu"), torch.bfloat16) == "torch"


# (Hq, Hkv, D, block size): GQA ratios 1, 3, 4, 5, 8; head dims 64/128 (vector paths) and
# 16/40/48 (portable path); block sizes 8/16/32 and 5 (portable).
SHAPES = [(9, 3, 64, 16), (8, 8, 64, 8), (32, 4, 128, 32), (8, 1, 64, 16), (10, 2, 64, 16),
          (6, 2, 16, 16), (4, 4, 40, 5), (12, 3, 48, 8)]


@pytest.mark.parametrize("hq,hkv,d,bs", SHAPES)
def test_matches_reference(path, hq, hkv, d, bs):
    gen = torch.Generator().manual_seed(hq * 1000 + d * 10 + bs)
    for b, max_blocks in ((1, 1), (5, 7), (17, 3)):
        q, kc, vc, tables, lens = _case(gen, b, hq, hkv, d, bs, max_blocks)
        out = pa.paged_decode_attention(q, kc, vc, tables, lens, d ** -0.5)
        ref = pa.paged_decode_attention_ref(q, kc, vc, tables, lens, d ** -0.5)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_every_code_path_is_reachable():
    """The portable path always; AVX2 wherever the CPU has it (the build is -march=native);
    a cap selects each path; shapes a vector path cannot take fall back."""
    paths = _paths_here()
    assert paths[0] == "scalar"
    flags = open("/proc/cpuinfo").read()
    if " avx2" in flags and " fma" in flags:
        assert "avx2" in paths
    before = pa.set_max_isa("avx512")
    try:
        assert pa.isa(40, 5) == "scalar"
        if "avx512" in paths:
            assert pa.isa(32, 16) == "avx2"  # head_dim 32: AVX2 only
    finally:
        pa.set_max_isa(before)


def _chunked_rows(gen, hq, hkv, d, bs):
    """A batch like a mixed step: sequence 0 prefills a chunk of positions 5..40, sequence 1
    its first 9 tokens, sequences 2 and 3 decode one token each."""
    nb, max_blocks = 40, 4
    kc, vc = torch.randn(nb, bs, hkv, d, generator=gen), torch.randn(nb, bs, hkv, d, generator=gen)
    tables = torch.randperm(nb, generator=gen)[:4 * max_blocks].view(4, max_blocks)
    spans = [(0, 5, 41), (1, 0, 9), (2, 50, 51), (3, 3, 4)]  # (sequence, first pos, end)
    row_table = torch.tensor([s for s, a, e in spans for _ in range(a, e)])
    row_len = torch.tensor([p + 1 for _, a, e in spans for p in range(a, e)])
    q = torch.randn(len(row_table), hq, d, generator=gen)
    return q, kc, vc, tables, row_table, row_len


@pytest.mark.parametrize("hq,hkv,d,bs", [(9, 3, 64, 16), (32, 4, 128, 32), (6, 2, 16, 16)])
def test_prefill_rows_match_reference(path, hq, hkv, d, bs):
    gen = torch.Generator().manual_seed(11)
    q, kc, vc, tables, rt, rl = _chunked_rows(gen, hq, hkv, d, bs)
    out = pa.paged_attention_rows(q, kc, vc, tables, rt, rl, d ** -0.5)
    ref = pa.paged_attention_rows_ref(q, kc, vc, tables, rt, rl, d ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


def test_a_row_does_not_depend_on_chunking_or_batch(path):
    """Every row runs the same arithmetic: a prompt token's output is bitwise the same in one
    chunk, in any split into chunks, as a lone decode-style row, and beside other sequences,
    with 1 or 2 threads."""
    gen = torch.Generator().manual_seed(12)
    q, kc, vc, tables, rt, rl = _chunked_rows(gen, 9, 3, 64, 16)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            whole = pa.paged_attention_rows(q, kc, vc, tables, rt, rl, 0.125)
            chunk = slice(0, 36)  # sequence 0's rows, split at 7 and 20
            parts = [pa.paged_attention_rows(q[a:b], kc, vc, tables, rt[a:b], rl[a:b], 0.125)
                     for a, b in ((0, 7), (7, 20), (20, 36))]
            assert torch.equal(torch.cat(parts), whole[chunk]), threads
            for i in (0, 13, 35, 36, 45, 46):
                alone = pa.paged_decode_attention(q[i:i + 1], kc, vc, tables[rt[i]:rt[i] + 1],
                                                  rl[i:i + 1], 0.125)
                assert torch.equal(alone[0], whole[i]), (threads, i)
    finally:
        torch.set_num_threads(before)


def test_later_tokens_never_reach_a_prefill_row(path):
    """A row sees its context only: the cache rows after it (later tokens of its own chunk,
    stale memory, even NaN/inf) weigh exactly nothing."""
    gen = torch.Generator().manual_seed(13)
    q, kc, vc, tables, rt, rl = _chunked_rows(gen, 9, 3, 64, 16)
    i = 20  # sequence 0, position 20
    clean = pa.paged_attention_rows(q[i:i + 1], kc, vc, tables, rt[i:i + 1], rl[i:i + 1], 0.1)
    table = tables[0].tolist()
    for pos in range(int(rl[i]), 4 * 16):
        kc[table[pos // 16], pos % 16] = float("nan")
        vc[table[pos // 16], pos % 16] = float("inf")
    dirty = pa.paged_attention_rows(q[i:i + 1], kc, vc, tables, rt[i:i + 1], rl[i:i + 1], 0.1)
    assert torch.equal(clean, dirty)


def test_rows_past_the_end_never_reach_the_output(path):
    """Stale memory after a sequence's last token (even NaN/inf) must weigh exactly nothing."""
    gen = torch.Generator().manual_seed(3)
    for d, bs in ((64, 16), (40, 5)):
        q, kc, vc, tables, lens = _case(gen, 4, 6, 2, d, bs, 3)
        lens[:] = torch.tensor([1, bs + 3, 2 * bs - 1, 3 * bs - 2])
        clean = pa.paged_decode_attention(q, kc, vc, tables, lens, 0.1)
        for i, n in enumerate(lens.tolist()):
            last = tables[i, (n - 1) // bs]
            kc[last, (n - 1) % bs + 1:] = float("nan")
            vc[last, (n - 1) % bs + 1:] = float("inf")
        dirty = pa.paged_decode_attention(q, kc, vc, tables, lens, 0.1)
        assert torch.equal(clean, dirty)


def test_threads_do_not_change_the_result(path):
    gen = torch.Generator().manual_seed(5)
    q, kc, vc, tables, lens = _case(gen, 24, 9, 3, 64, 16, 6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = pa.paged_decode_attention(q, kc, vc, tables, lens, 0.125)
        torch.set_num_threads(2)
        two = pa.paged_decode_attention(q, kc, vc, tables, lens, 0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each (sequence, KV head) is one thread's work: no split sums


def test_work_split_does_not_change_the_result(path):
    """Whole-sequence items (enough sequences per thread) and (sequence, KV head) items (few
    sequences) run the same per-head arithmetic: a sequence's output is bitwise the same alone
    and inside a batch, with 1 or 2 threads."""
    gen = torch.Generator().manual_seed(6)
    q, kc, vc, tables, lens = _case(gen, 24, 9, 3, 64, 16, 6)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            batch = pa.paged_decode_attention(q, kc, vc, tables, lens, 0.125)
            for i in (0, 1, 5, 23):
                alone = pa.paged_decode_attention(q[i:i + 1], kc, vc, tables[i:i + 1],
                                                  lens[i:i + 1], 0.125)
                assert torch.equal(alone[0], batch[i]), (threads, i)
    finally:
        torch.set_num_threads(before)


def test_wrapper_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(1)
    q, kc, vc, tables, lens = _case(gen, 3, 9, 3, 64, 16, 2)
    with pytest.raises(AssertionError):
        pa.paged_decode_attention(q.double(), kc, vc, tables, lens, 0.1)
    with pytest.raises(AssertionError):
        pa.paged_decode_attention(q, kc, vc, tables.int(), lens, 0.1)
    with pytest.raises(AssertionError):
        pa.paged_decode_attention(q[:, :8], kc, vc, tables, lens, 0.1)  # 8 heads over 3 KV heads
    with pytest.raises(AssertionError):
        pa.paged_decode_attention(q.transpose(0, 1).contiguous().transpose(0, 1), kc, vc,
                                  tables, lens, 0.1)
    with pytest.raises(ValueError, match="limits"):
        big = torch.randn(1, 2, 512)
        kb = torch.randn(4, 16, 1, 512)
        pa.paged_decode_attention(big, kb, kb, tables[:1], lens[:1].clamp(max=16), 0.1)


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_NATIVE_CACHE", str(tmp_path))
    first = build.build("paged_attention")
    mtime = first.stat().st_mtime_ns
    assert build.build("paged_attention") == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left behind


def test_build_error_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("SWITCHYARD_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(build.NativeBuildError, match="does not run"):
        build.build("paged_attention")


def test_kv_write_matches_index_copy_and_checks_slots():
    from services.worker.model.attention import write_kv as torch_write_kv

    gen = torch.Generator().manual_seed(7)
    cache = torch.randn(2, 6, 4, 3, 8, generator=gen)  # [2, NB, BS, Hkv, D]
    k, v = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 3, 8, generator=gen)
    slots = torch.tensor([0, 23, 7, 8, 12])  # first, last, a block edge, scattered
    expected = cache.clone()
    torch_write_kv(expected, k, v, slots)
    pa.write_kv(cache, k, v, slots)
    assert torch.equal(cache, expected)
    # A non-contiguous source (a slice of the fused qkv output) is written the same way.
    wide = torch.randn(5, 6, 8, generator=gen)
    pa.write_kv(cache, wide[:, :3], wide[:, 3:], slots)
    torch_write_kv(expected, wide[:, :3], wide[:, 3:], slots)
    assert torch.equal(cache, expected)
    for bad in ([0, 24], [-1, 3]):
        with pytest.raises(IndexError, match="slot_mapping out of range"):
            pa.write_kv(cache, k[:2], v[:2], torch.tensor(bad))
    assert torch.equal(cache, expected)  # nothing written by the refused calls


def test_decode_into_out_matches():
    gen = torch.Generator().manual_seed(3)
    q, kc, vc, tables, lens = _case(gen, 6, 9, 3, 64, 16, 4)
    out = torch.empty_like(q)
    res = pa.paged_decode_attention(q, kc, vc, tables, lens, 0.125, out=out)
    assert res is out
    torch.testing.assert_close(out, pa.paged_decode_attention_ref(q, kc, vc, tables, lens,
                                                                   0.125), rtol=1e-5, atol=2e-6)
