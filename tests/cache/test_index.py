"""The in-process vector index: groups, replace, swap-remove, thresholded top-k."""

from __future__ import annotations

import numpy as np
import pytest

from services.cache.index import VectorIndex


def unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_search_is_exact_top_k_above_threshold_within_group():
    rng = np.random.default_rng(0)
    idx = VectorIndex(dim=16, initial_capacity=2)  # forces several capacity doublings
    vecs = unit(rng, 50)
    idx.add_many([f"e{i}" for i in range(50)], ["g"] * 50, vecs)
    idx.add("other", "h", vecs[0])
    q = vecs[7]
    cands, best = idx.search("g", q, threshold=-1.0, k=5)
    expected = np.argsort(-(vecs @ q))[:5]
    assert [c.entry_id for c in cands] == [f"e{i}" for i in expected]
    assert cands[0].score == pytest.approx(1.0, abs=2e-3) and best == pytest.approx(1.0, abs=2e-3)
    assert [c.entry_id for c in idx.search("h", vecs[0], 0.5, 5)[0]] == ["other"]
    assert idx.search("missing", q, 0.0, 5) == ([], 0.0)


def test_threshold_filters_but_best_is_reported():
    idx = VectorIndex(dim=2)
    idx.add("a", "g", np.array([1.0, 0.0], dtype=np.float32))
    q = np.array([0.6, 0.8], dtype=np.float32)
    cands, best = idx.search("g", q, threshold=0.9, k=3)
    assert cands == [] and best == pytest.approx(0.6, abs=1e-3)


def test_remove_swaps_last_row_and_keeps_ids_consistent():
    rng = np.random.default_rng(1)
    idx = VectorIndex(dim=16)
    vecs = unit(rng, 10)
    idx.add_many([f"e{i}" for i in range(10)], ["g"] * 10, vecs)
    assert idx.remove("e3") and not idx.remove("e3")
    assert len(idx) == 9 and "e3" not in idx
    for i in (0, 5, 9):  # e9 moved into e3's row; every remaining id still finds itself
        cands, _ = idx.search("g", vecs[i], 0.99, 1)
        assert cands[0].entry_id == f"e{i}"
    for i in range(10):
        idx.remove(f"e{i}")
    assert idx.group_size("g") == 0 and len(idx) == 0


def test_add_replaces_vector_and_can_move_group():
    idx = VectorIndex(dim=2)
    idx.add("a", "g", np.array([1.0, 0.0], dtype=np.float32))
    idx.add("a", "g", np.array([0.0, 1.0], dtype=np.float32))
    assert idx.group_size("g") == 1
    assert idx.search("g", np.array([0.0, 1.0], dtype=np.float32), 0.99, 1)[0][0].entry_id == "a"
    idx.add("a", "h", np.array([0.0, 1.0], dtype=np.float32))
    assert idx.group_size("g") == 0 and idx.group_size("h") == 1 and idx.ids() == {"a"}


def test_add_many_checks_shape():
    with pytest.raises(ValueError, match=r"\[2, 4\]"):
        VectorIndex(dim=4).add_many(["a", "b"], ["g", "g"], np.zeros((2, 3), dtype=np.float32))


def at_cosine(q: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at cosine exactly c to unit q."""
    u = rng.standard_normal(q.shape).astype(np.float32)
    u -= (u @ q) * q
    return (c * q + np.sqrt(1 - c * c) * u / np.linalg.norm(u)).astype(np.float32)


def test_simhash_prefilter_finds_every_neighbor_above_threshold():
    rng = np.random.default_rng(2)
    dim, n = 384, 5000
    filler = unit(rng, n, dim)
    queries = unit(rng, 300, dim)
    near = np.stack([at_cosine(q, c, rng) for q, c in zip(queries, rng.uniform(0.85, 1.0, 300))])
    ids = [f"f{i}" for i in range(n)] + [f"n{i}" for i in range(300)]
    prefiltered = VectorIndex(dim, exact_scan_max=0)  # every search uses SimHash
    exact = VectorIndex(dim, exact_scan_max=10**9)
    for idx in (prefiltered, exact):
        idx.add_many(ids, ["g"] * len(ids), np.concatenate([filler, near]))
    for i, q in enumerate(queries):
        got, _ = prefiltered.search("g", q, 0.85, 3)
        want, _ = exact.search("g", q, 0.85, 3)
        assert [c.entry_id for c in got] == [c.entry_id for c in want] == [f"n{i}"]
        assert got[0].score == pytest.approx(want[0].score, abs=1e-6)


def test_simhash_distances_and_cut():
    from services.cache.index import SimHash

    sh = SimHash(16, bits=128)
    rng = np.random.default_rng(3)
    v = unit(rng, 20, 16)
    codes = sh.codes(v)
    d = sh.distances(codes, codes[:, 0])
    bits = np.unpackbits(codes.T.copy().view(np.uint8), axis=1)
    assert list(d) == [int((bits[i] != bits[0]).sum()) for i in range(20)]
    assert d[0] == 0
    assert sh.cut(0.99) < sh.cut(0.85) < 0.4 * 128
    assert sh.cut(0.2) is None  # not selective: callers scan in full


def test_low_threshold_falls_back_to_a_full_scan():
    rng = np.random.default_rng(4)
    v = unit(rng, 100, 16)
    idx = VectorIndex(16, exact_scan_max=0)
    idx.add_many([f"e{i}" for i in range(100)], ["g"] * 100, v)
    cands, best = idx.search("g", v[5], threshold=0.0, k=100)
    assert len(cands) == int((v @ v[5] >= 0).sum()) and cands[0].entry_id == "e5"
