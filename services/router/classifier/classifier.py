"""DifficultyClassifier: text -> (score, tier, reason), with per-tenant thresholds."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.router.classifier.embedder import ClassifierEmbedder
from services.router.classifier.features import text_features
from services.router.classifier.model import WEIGHTS_PATH, DifficultyModel, Thresholds
from services.router.domain import Tier


@dataclass(frozen=True)
class Decision:
    """The classifier's verdict on one request."""

    score: float
    """Expected difficulty in [0, 1] (higher = harder)."""
    tier: Tier
    reason: str
    """e.g. "classifier: 0.72 >= large_at 0.65"."""


def tier_for(score: float, t: Thresholds) -> tuple[Tier, str]:
    """Maps a score to a tier with the explanation for RouteInfo.decision_reason."""
    if score >= t.large_at:
        return Tier.LARGE, f"classifier: {score:.2f} >= large_at {t.large_at:.2f}"
    if score >= t.quantized_at:
        return Tier.QUANTIZED, (f"classifier: quantized_at {t.quantized_at:.2f} <= {score:.2f} "
                                f"< large_at {t.large_at:.2f}")
    return Tier.SMALL, f"classifier: {score:.2f} < quantized_at {t.quantized_at:.2f}"


class DifficultyClassifier:
    """MiniLM embedding + text features -> softmax regression -> expected difficulty.

    Thread-safe; `score` takes ~5-12 ms of one core (run it off the event loop). Recent texts'
    scores are kept in a small LRU (repeated prompts are common: retries, templates).
    """

    def __init__(self, model: DifficultyModel, embedder: ClassifierEmbedder, lru_size: int = 4096):
        if embedder.spec != model.spec:
            raise ValueError(f"embedder {embedder.spec} differs from the one the model was "
                             f"trained on ({model.spec})")
        self.model = model
        self.embedder = embedder
        self._lru: OrderedDict[str, float] = OrderedDict()
        self._lru_size = lru_size
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_dir: Path, weights: Path = WEIGHTS_PATH) -> DifficultyClassifier:
        model = DifficultyModel.load(weights)
        return cls(model, ClassifierEmbedder(model_dir, model.spec))

    @property
    def default_thresholds(self) -> Thresholds:
        return self.model.thresholds

    def score(self, text: str) -> float:
        with self._lock:
            cached = self._lru.get(text)
            if cached is not None:
                self._lru.move_to_end(text)
                return cached
        emb = self.embedder.embed([text])
        probs = self.model.predict_proba(emb, text_features(text)[None, :])
        value = float(np.clip(self.model.score(probs)[0], 0.0, 1.0))
        with self._lock:
            self._lru[text] = value
            while len(self._lru) > self._lru_size:
                self._lru.popitem(last=False)
        return value

    def classify(self, text: str, thresholds: Thresholds | None = None) -> Decision:
        """Scores `text` and maps it to a tier with `thresholds` (default: the trained ones)."""
        score = self.score(text)
        tier, reason = tier_for(score, thresholds or self.model.thresholds)
        return Decision(score=score, tier=tier, reason=reason)
