"""In-process vector index: cosine top-k per semantic group, exact up to a size, then prefiltered.

Redis (7.0, no modules) has no vector search, so every replica keeps the vectors of the entries
in memory, grouped by semantic group key (scope + context; see keys.py): a lookup only scans
its own group. Rows are unit-norm float16; reported scores are float32 dot products of the
query with those rows (error ~2e-4 against the float32 vectors).

Groups of at most `exact_scan_max` rows are scanned in full (brute force, exact). A full scan is
memory-bound: at 100k rows (77 MB) it takes 7-15 ms on one core of the 2-core test machine and
evicts the embedding model's weights from L3. Larger groups are prefiltered with SimHash: each
row also keeps 384 sign bits of random projections (48 bytes), the query's bits are compared
by Hamming distance (~1 ms at 100k), and only rows whose distance is plausible for a cosine at
or above the threshold are re-scored exactly. For a row at cosine c the distance is
Binomial(384, arccos(c)/pi); the cut sits 4.5 standard deviations above the mean at the
threshold, so a row at the threshold is dropped with probability ~3e-6 (less above it). A
dropped row is only a missed hit: every served hit is still checked by exact score and guard.
When the cut is not selective (low thresholds, or over a quarter of the rows pass) the group is
scanned in full.

Removal swaps the last row into the hole, so matrices stay dense. The index is a cache of
Redis: rebuilt at start and kept in sync by `services.cache.sync`. Thread-safe (one lock).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_F16_SLACK = 2e-3  # rows whose float16 scan score is this close to the threshold are re-scored
_SIMHASH_BITS = 384
_SIMHASH_Z = 4.5
_SIMHASH_SEED = 20_260_101


@dataclass(frozen=True)
class Candidate:
    """An entry id and its cosine similarity to the query."""

    entry_id: str
    score: float


class SimHash:
    """Sign bits of fixed random projections; Hamming distance estimates the angle."""

    def __init__(self, dim: int, bits: int = _SIMHASH_BITS, seed: int = _SIMHASH_SEED):
        assert bits % 64 == 0
        self.bits = bits
        self.words = bits // 64
        rng = np.random.default_rng(seed)
        self._proj = rng.standard_normal((dim, bits)).astype(np.float32)

    def codes(self, vectors: np.ndarray) -> np.ndarray:
        """[n, dim] float32 -> [words, n] uint64 (column per row, for word-wise scans)."""
        packed = np.packbits(vectors @ self._proj > 0, axis=1)  # [n, bits / 8]
        return np.ascontiguousarray(packed.view(np.uint64).T)

    def cut(self, threshold: float) -> int | None:
        """Largest distance kept for `threshold`; None when a prefilter would not be selective."""
        p = math.acos(min(max(threshold, -1.0), 1.0)) / math.pi
        cut = self.bits * (p + _SIMHASH_Z * math.sqrt(p * (1 - p) / self.bits))
        return int(cut) if cut < 0.4 * self.bits else None

    def distances(self, codes: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Hamming distances [n] (uint16) of code columns [words, n] to a query code [words]."""
        n = codes.shape[1]
        acc = np.zeros(n, dtype=np.uint16)
        buf = np.empty(n, dtype=np.uint64)
        cnt = np.empty(n, dtype=np.uint8)
        for w in range(self.words):
            np.bitwise_xor(codes[w], query[w], out=buf)
            np.bitwise_count(buf, out=cnt)
            acc += cnt
        return acc


@dataclass
class _Group:
    mat: torch.Tensor  # [capacity, dim] float16; rows [0, n) are live
    codes: np.ndarray  # [words, capacity] uint64 SimHash columns
    ids: list[str]
    rows: dict[str, int]

    @property
    def n(self) -> int:
        return len(self.ids)


class VectorIndex:
    """Entry vectors by semantic group, with thresholded top-k cosine search."""

    def __init__(self, dim: int, exact_scan_max: int = 20_000, initial_capacity: int = 64):
        self.dim = dim
        self.exact_scan_max = exact_scan_max
        self._initial = initial_capacity
        self._simhash = SimHash(dim)
        self._groups: dict[str, _Group] = {}
        self._group_of: dict[str, str] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._group_of)

    def __contains__(self, entry_id: str) -> bool:
        with self._lock:
            return entry_id in self._group_of

    def ids(self) -> set[str]:
        """Ids of every indexed entry (a copy)."""
        with self._lock:
            return set(self._group_of)

    def group_size(self, group: str) -> int:
        """Number of entries in `group` (0 if none)."""
        with self._lock:
            g = self._groups.get(group)
            return g.n if g else 0

    def add(self, entry_id: str, group: str, vector: np.ndarray) -> None:
        """Adds or replaces one entry. `vector`: [dim], unit norm."""
        self.add_many([entry_id], [group], vector.reshape(1, -1))

    def add_many(self, entry_ids: list[str], groups: list[str], vectors: np.ndarray) -> None:
        """Adds or replaces entries. `vectors`: [len(entry_ids), dim], unit rows."""
        if vectors.shape != (len(entry_ids), self.dim):
            raise ValueError(f"vectors must be [{len(entry_ids)}, {self.dim}], "
                             f"got {list(vectors.shape)}")
        vectors = np.asarray(vectors, dtype=np.float32)
        vecs = torch.tensor(vectors).half()  # a copy: the input may be a read-only buffer
        codes = self._simhash.codes(vectors)
        with self._lock:
            for i, (eid, group) in enumerate(zip(entry_ids, groups)):
                if self._group_of.get(eid, group) != group:
                    self._remove_locked(eid)
                g = self._groups.get(group) or self._new_group(group)
                row = g.rows.get(eid)
                if row is None:
                    row = g.n
                    if row == g.mat.shape[0]:  # double the capacity
                        g.mat = torch.cat([g.mat, torch.empty_like(g.mat)])
                        g.codes = np.concatenate([g.codes, np.empty_like(g.codes)], axis=1)
                    g.ids.append(eid)
                    g.rows[eid] = row
                    self._group_of[eid] = group
                g.mat[row] = vecs[i]
                g.codes[:, row] = codes[:, i]

    def _new_group(self, group: str) -> _Group:
        g = _Group(torch.empty(self._initial, self.dim, dtype=torch.float16),
                   np.empty((self._simhash.words, self._initial), dtype=np.uint64), [], {})
        self._groups[group] = g
        return g

    def remove(self, entry_id: str) -> bool:
        """Removes one entry; False if it was not indexed."""
        with self._lock:
            return self._remove_locked(entry_id)

    def _remove_locked(self, entry_id: str) -> bool:
        group = self._group_of.pop(entry_id, None)
        if group is None:
            return False
        g = self._groups[group]
        row = g.rows.pop(entry_id)
        last = g.n - 1
        if row != last:  # move the last row into the hole
            moved = g.ids[last]
            g.mat[row] = g.mat[last]
            g.codes[:, row] = g.codes[:, last]
            g.ids[row] = moved
            g.rows[moved] = row
        g.ids.pop()
        if not g.ids:
            del self._groups[group]
        return True

    def clear(self) -> None:
        """Drops every entry."""
        with self._lock:
            self._groups.clear()
            self._group_of.clear()

    def search(self, group: str, query: np.ndarray, threshold: float,
               k: int) -> tuple[list[Candidate], float]:
        """Entries of `group` with cosine >= threshold, best first, at most k.

        Returns (candidates, best score seen: the group's best for a full scan, the best
        prefiltered row's otherwise; 0.0 for an empty group). `query`: [dim], unit norm.
        """
        q32 = torch.tensor(np.asarray(query, dtype=np.float32))
        qcode = self._simhash.codes(q32.numpy().reshape(1, -1))[:, 0]
        cut = self._simhash.cut(threshold)
        with self._lock:
            g = self._groups.get(group)
            if g is None:
                return [], 0.0
            rows = None
            if g.n > self.exact_scan_max and cut is not None:
                dist = self._simhash.distances(g.codes[:, : g.n], qcode)
                kept = np.flatnonzero(dist <= cut)
                if len(kept) <= g.n // 4:
                    rows = torch.from_numpy(np.append(kept, dist.argmin()))
            if rows is None:
                rows = self._scan(g, q32, threshold, k)
            # Exact re-score (float32 dot with the float16 rows) of the rows that may qualify.
            exact = g.mat[rows].float() @ q32
            found = {g.ids[r]: s for s, r in zip(exact.tolist(), rows.tolist())}
        best = max(found.values())
        top = sorted(((s, e) for e, s in found.items() if s >= threshold), reverse=True)[:k]
        return [Candidate(eid, s) for s, eid in top], best

    @staticmethod
    def _scan(g: _Group, q32: torch.Tensor, threshold: float, k: int) -> torch.Tensor:
        """Full float16 scan: rows near or above the threshold, plus the best row."""
        scores = F.linear(q32.half().unsqueeze(0), g.mat[: g.n])[0]  # [n]
        rows = torch.nonzero(scores >= threshold - _F16_SLACK).flatten()
        if rows.numel() > 4 * k:
            rows = rows[torch.topk(scores[rows].float(), 4 * k).indices]
        return torch.cat([rows, scores.argmax().reshape(1)])
