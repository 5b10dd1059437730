"""The difficulty classifier: held-out accuracy, determinism of its data split, latency."""

from __future__ import annotations

import time

import numpy as np

from services.router.classifier import Thresholds, tier_for
from services.router.classifier.dataset import LABELS, load_examples, split
from services.router.classifier.features import FEATURE_NAMES, text_features
from services.router.domain import Tier

HELD_OUT_TIER_ACCURACY_FLOOR = 0.85
"""The shipped weights score 0.897 (87/97) on the held-out split with their thresholds (see
training_report.json), against 0.39 for the majority class, 0.74 for a length-only model and
0.89 for the text features alone (embedding-free). 0.85 is 4 errors below the shipped score: a
retrain that loses more than that (another torch build, an edit to the data) should be looked
at. The set is small and written by one author, so this measures fit to our labelling, not
real-world accuracy."""


def test_prompt_set_covers_every_category_and_level():
    examples = load_examples()
    assert len(examples) >= 300
    cats = {e.category for e in examples}
    assert cats == {"chat", "extraction", "classification", "summarization", "code", "math",
                    "reasoning"}
    for c in cats:
        for label in range(len(LABELS)):
            assert sum(e.category == c and e.label == label for e in examples) >= 15
    train, held = split(examples)
    assert 0.2 < len(held) / len(examples) < 0.3
    assert not {e.text for e in train} & {e.text for e in held}


def test_held_out_accuracy(classifier):
    _, held = split(load_examples())
    predicted = [classifier.classify(e.text).tier for e in held]
    truth = [(Tier.SMALL, Tier.QUANTIZED, Tier.LARGE)[e.label] for e in held]
    accuracy = np.mean([p == t for p, t in zip(predicted, truth)])
    assert accuracy >= HELD_OUT_TIER_ACCURACY_FLOOR, accuracy
    # Never an easy prompt on the large tier or a hard one on the small tier.
    assert not any({p, t} == {Tier.SMALL, Tier.LARGE} for p, t in zip(predicted, truth))


def test_thresholds_map_scores_to_tiers():
    t = Thresholds(quantized_at=0.3, large_at=0.7)
    assert tier_for(0.1, t)[0] == Tier.SMALL
    assert tier_for(0.3, t)[0] == Tier.QUANTIZED
    assert tier_for(0.7, t)[0] == Tier.LARGE
    assert "0.72 >= large_at 0.70" in tier_for(0.72, t)[1]


def test_scores_order_and_latency(classifier):
    easy = classifier.score("What's the capital of Italy?")
    hard = classifier.score("Prove that every group of order 15 is cyclic and explain each "
                            "step of the Sylow argument.")
    assert easy < 0.2 and hard > 0.8
    assert len(text_features("x")) == len(FEATURE_NAMES)
    texts = [f"Write a short note number {i} about the weather in a city of your choice."
             for i in range(30)]  # distinct texts: no LRU hits
    start = time.perf_counter()
    for text in texts:
        classifier.score(text)
    per_call_ms = (time.perf_counter() - start) * 1000 / len(texts)
    assert per_call_ms < 50, per_call_ms  # a loose bound for a shared CI core; see the bench
