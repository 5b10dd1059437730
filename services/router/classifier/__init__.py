"""The router's difficulty classifier (see classifier.py; training in train.py)."""

from services.router.classifier.classifier import Decision, DifficultyClassifier, tier_for
from services.router.classifier.model import DifficultyModel, Thresholds

__all__ = ["Decision", "DifficultyClassifier", "DifficultyModel", "Thresholds", "tier_for"]
