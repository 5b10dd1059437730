"""The difficulty model: multinomial logistic regression over [MiniLM embedding, text features].

Pure numpy, saved as one .npz (~5 KB of float32 weights plus the embedder spec and default
thresholds). Training lives in train.py; this module only loads and predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.router.classifier.embedder import EmbedderSpec
from services.router.classifier.features import FEATURE_NAMES

WEIGHTS_PATH = Path(__file__).parent / "weights.npz"
LEVELS = np.array([0.0, 0.5, 1.0], dtype=np.float32)
"""Difficulty of each class (easy, medium, hard); the score is their expectation."""


@dataclass(frozen=True)
class Thresholds:
    """Score cut points between tiers: small below `quantized_at`, large from `large_at`."""

    quantized_at: float
    large_at: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.quantized_at <= self.large_at <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= quantized_at <= large_at <= 1, got "
                             f"quantized_at={self.quantized_at}, large_at={self.large_at}")


@dataclass(frozen=True)
class DifficultyModel:
    """Softmax regression: probs = softmax([emb, (feat - mean) / std] @ w + b)."""

    w: np.ndarray
    """[dim + num_features, 3] float32."""
    b: np.ndarray
    """[3] float32."""
    feat_mean: np.ndarray
    feat_std: np.ndarray
    spec: EmbedderSpec
    thresholds: Thresholds
    """Default tier thresholds, fitted on the training split."""

    def predict_proba(self, emb: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """emb [n, dim], feats [n, num_features] -> class probabilities [n, 3]."""
        x = np.concatenate([emb, (feats - self.feat_mean) / self.feat_std], axis=1)
        logits = x @ self.w + self.b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    @staticmethod
    def score(probs: np.ndarray) -> np.ndarray:
        """Expected difficulty in [0, 1] from class probabilities [n, 3]."""
        return probs @ LEVELS

    def save(self, path: Path) -> None:
        np.savez(path, w=self.w.astype(np.float32), b=self.b.astype(np.float32),
                 feat_mean=self.feat_mean, feat_std=self.feat_std,
                 feature_names=np.array(FEATURE_NAMES),
                 max_tokens=self.spec.max_tokens, int8=self.spec.int8,
                 thresholds=np.array([self.thresholds.quantized_at, self.thresholds.large_at]))

    @classmethod
    def load(cls, path: Path = WEIGHTS_PATH) -> DifficultyModel:
        with np.load(path) as z:
            names = tuple(str(n) for n in z["feature_names"])
            if names != FEATURE_NAMES:
                raise ValueError(f"{path}: trained on features {names}, code has "
                                 f"{FEATURE_NAMES}; retrain (python -m "
                                 "services.router.classifier.train)")
            t = z["thresholds"]
            return cls(w=z["w"], b=z["b"], feat_mean=z["feat_mean"], feat_std=z["feat_std"],
                       spec=EmbedderSpec(int(z["max_tokens"]), bool(z["int8"])),
                       thresholds=Thresholds(float(t[0]), float(t[1])))
