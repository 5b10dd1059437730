"""The labelled prompt set (data/prompts.tsv) and its fixed held-out split."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

LABELS = ("easy", "medium", "hard")
DATA_PATH = Path(__file__).parent / "data" / "prompts.tsv"
HELD_OUT_BUCKETS = 4
"""One prompt in HELD_OUT_BUCKETS goes to the held-out split (by a hash of its text)."""


@dataclass(frozen=True)
class Example:
    """One labelled prompt."""

    text: str
    label: int
    """Index into LABELS."""
    category: str
    """chat, extraction, classification, summarization, code, math or reasoning."""

    @property
    def held_out(self) -> bool:
        """True for the held-out split: stable under reordering and additions elsewhere."""
        digest = hashlib.sha256(self.text.encode()).digest()
        return digest[0] % HELD_OUT_BUCKETS == 0


def load_examples(path: Path = DATA_PATH) -> list[Example]:
    """Reads the TSV (label, category, prompt; '#' lines are comments, then a header)."""
    rows = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    out = []
    for i, line in enumerate(rows[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 3 or parts[0] not in LABELS:
            raise ValueError(f"{path}: bad row {i}: {line[:60]!r}")
        out.append(Example(text=parts[2], label=LABELS.index(parts[0]), category=parts[1]))
    return out


def split(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held_out)."""
    return ([e for e in examples if not e.held_out], [e for e in examples if e.held_out])
