"""In-process vector index: brute-force cosine search, one matrix per semantic group.

Redis (7.0, no modules) has no vector search, so every replica keeps the vectors of the entries
in memory, grouped by semantic group key (scope + context; see keys.py): a lookup only scans
its own group. Rows are unit-norm float16 (half the memory traffic of float32; the scan is
memory-bound): at 100k rows in one group a scan takes ~6-10 ms on one core. Candidates are
re-scored in float32 from their float16 rows (error ~2e-4 against the float32 vectors).
Removal swaps the last row into the hole, so matrices stay dense.

The index is a cache of Redis: it is rebuilt from Redis at start and kept in sync by
`services.cache.sync`. Thread-safe (one lock; a search holds it for the scan).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Candidates whose float16 score is within this of the threshold are re-scored in float32.
_F16_SLACK = 2e-3


@dataclass(frozen=True)
class Candidate:
    """An entry id and its cosine similarity to the query."""

    entry_id: str
    score: float


@dataclass
class _Group:
    mat: torch.Tensor  # [capacity, dim] float16; rows [0, n) are live
    ids: list[str]
    rows: dict[str, int]

    @property
    def n(self) -> int:
        return len(self.ids)


class VectorIndex:
    """Entry vectors by semantic group, with exact (brute-force) top-k search."""

    def __init__(self, dim: int, initial_capacity: int = 64):
        self.dim = dim
        self._initial = initial_capacity
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
        vecs = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).half()
        with self._lock:
            for i, (eid, group) in enumerate(zip(entry_ids, groups)):
                if self._group_of.get(eid, group) != group:
                    self._remove_locked(eid)
                g = self._groups.get(group)
                if g is None:
                    g = self._groups[group] = _Group(
                        torch.empty(self._initial, self.dim, dtype=torch.float16), [], {})
                row = g.rows.get(eid)
                if row is None:
                    row = g.n
                    if row == g.mat.shape[0]:
                        g.mat = torch.cat([g.mat, torch.empty_like(g.mat)])  # double capacity
                    g.ids.append(eid)
                    g.rows[eid] = row
                    self._group_of[eid] = group
                g.mat[row] = vecs[i]

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

        Returns (candidates, best score in the group, or 0.0 if the group is empty).
        `query`: [dim], unit norm.
        """
        q16 = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32)).half()
        with self._lock:
            g = self._groups.get(group)
            if g is None:
                return [], 0.0
            mat = g.mat[: g.n]
            # scores: [n] (float16 scan, float32 accumulate inside the matmul)
            scores = F.linear(q16.unsqueeze(0), mat)[0]
            best = float(scores.max())
            rows = torch.nonzero(scores >= threshold - _F16_SLACK).flatten()
            if rows.numel() > 4 * k:
                rows = rows[torch.topk(scores[rows].float(), 4 * k).indices]
            exact = mat[rows].float() @ torch.from_numpy(query.astype(np.float32, copy=False))
            found = [(float(s), g.ids[int(r)]) for s, r in zip(exact.tolist(), rows.tolist())]
        found = sorted((c for c in found if c[0] >= threshold), reverse=True)[:k]
        if found:
            best = max(best, found[0][0])
        return [Candidate(eid, s) for s, eid in found], best
