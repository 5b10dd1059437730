"""Retrains the difficulty model reproducibly: `python -m services.router.classifier.train`.

Embeds every prompt of data/prompts.tsv (MiniLM, as EmbedderSpec says), adds the text
features, fits a softmax regression with L2 (strength picked by 5-fold cross-validation on the
training split, folds from a fixed seed), fits the two tier thresholds on the training split,
and reports accuracy on the held-out split. Writes weights.npz and training_report.json beside
this file (or --out). Same data + same seed + same torch build = the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from services.router.classifier.dataset import LABELS, Example, load_examples, split
from services.router.classifier.embedder import ClassifierEmbedder, EmbedderSpec
from services.router.classifier.features import text_features
from services.router.classifier.model import LEVELS, DifficultyModel, Thresholds

SEED = 20261121
L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
STEPS = 3000
LR = 0.5


def fit_softmax(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch gradient descent with Nesterov momentum on mean cross-entropy + l2 |w|^2.

    Deterministic (no sampling): the same inputs give the same weights."""
    n, d = x.shape
    onehot = np.eye(len(LABELS))[y]
    w = np.zeros((d, len(LABELS)))
    b = np.zeros(len(LABELS))
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(STEPS):
        lw, lb = w + 0.9 * vw, b + 0.9 * vb
        logits = x @ lw + lb
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / n
        vw = 0.9 * vw - LR * (x.T @ g + 2 * l2 * lw)
        vb = 0.9 * vb - LR * g.sum(axis=0)
        w, b = w + vw, b + vb
    return w, b


def predict(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def pick_l2(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[float, dict]:
    folds = rng.permutation(len(y)) % 5
    scores = {}
    for l2 in L2_GRID:
        correct = 0
        for k in range(5):
            tr, va = folds != k, folds == k
            w, b = fit_softmax(x[tr], y[tr], l2)
            correct += int((predict(x[va], w, b).argmax(1) == y[va]).sum())
        scores[l2] = correct / len(y)
    best = max(L2_GRID, key=lambda v: (scores[v], v))  # ties: the stronger regularizer
    return best, scores


def fit_thresholds(scores: np.ndarray, y: np.ndarray) -> Thresholds:
    """The (quantized_at, large_at) pair that maps train scores to tiers most accurately
    (easy -> small, medium -> quantized, hard -> large); ties go to the widest middle band."""
    grid = np.round(np.arange(0.05, 0.96, 0.01), 2)
    best, best_key = Thresholds(0.33, 0.67), (-1.0, 0.0)
    for lo in grid:
        for hi in grid[grid >= lo]:
            pred = np.where(scores >= hi, 2, np.where(scores >= lo, 1, 0))
            key = (float((pred == y).mean()), -abs((lo + hi) - 1.0))
            if key > best_key:
                best, best_key = Thresholds(float(lo), float(hi)), key
    return best


def tier_predictions(scores: np.ndarray, t: Thresholds) -> np.ndarray:
    return np.where(scores >= t.large_at, 2, np.where(scores >= t.quantized_at, 1, 0))


def featurize(examples: list[Example], embedder: ClassifierEmbedder) -> tuple[np.ndarray, ...]:
    emb = embedder.embed([e.text for e in examples])
    feats = np.stack([text_features(e.text) for e in examples])
    return emb, feats, np.array([e.label for e in examples])


def report(name: str, y: np.ndarray, pred: np.ndarray, cats: list[str]) -> dict:
    confusion = np.zeros((3, 3), dtype=int)
    for t, p in zip(y, pred):
        confusion[t, p] += 1
    per_cat = {c: float(np.mean([p == t for p, t, cc in zip(pred, y, cats) if cc == c]))
               for c in sorted(set(cats))}
    return {"split": name, "n": len(y), "accuracy": float((pred == y).mean()),
            "off_by_two": int(((pred - y) == 2).sum() + ((y - pred) == 2).sum()),
            "confusion_rows_true_cols_pred": confusion.tolist(), "per_category": per_cat}


def train(spec: EmbedderSpec, model_dir: Path) -> tuple[DifficultyModel, dict]:
    import torch

    torch.set_num_threads(1)
    train_ex, test_ex = split(load_examples())
    embedder = ClassifierEmbedder(model_dir, spec)
    emb_tr, f_tr, y_tr = featurize(train_ex, embedder)
    emb_te, f_te, y_te = featurize(test_ex, embedder)
    mean, std = f_tr.mean(0), f_tr.std(0) + 1e-6
    x_tr = np.concatenate([emb_tr, (f_tr - mean) / std], axis=1)
    l2, cv = pick_l2(x_tr, y_tr, np.random.default_rng(SEED))
    w, b = fit_softmax(x_tr, y_tr, l2)
    thresholds = fit_thresholds(predict(x_tr, w, b) @ LEVELS, y_tr)
    model = DifficultyModel(w=w.astype(np.float32), b=b.astype(np.float32),
                            feat_mean=mean.astype(np.float32), feat_std=std.astype(np.float32),
                            spec=spec, thresholds=thresholds)
    s_tr = model.score(model.predict_proba(emb_tr, f_tr))
    p_te = model.predict_proba(emb_te, f_te)
    s_te = model.score(p_te)
    out = {
        "seed": SEED, "embedder": {"max_tokens": spec.max_tokens, "int8": spec.int8},
        "l2": l2, "cv_accuracy_by_l2": {str(k): v for k, v in cv.items()},
        "thresholds": {"quantized_at": thresholds.quantized_at, "large_at": thresholds.large_at},
        "train_tier": report("train", y_tr, tier_predictions(s_tr, thresholds),
                             [e.category for e in train_ex]),
        "held_out_tier": report("held_out", y_te, tier_predictions(s_te, thresholds),
                                [e.category for e in test_ex]),
        "held_out_argmax": report("held_out", y_te, p_te.argmax(1),
                                  [e.category for e in test_ex]),
    }
    return model, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.router.classifier.train",
                                description=__doc__)
    p.add_argument("--max-tokens", type=int, default=EmbedderSpec.max_tokens)
    p.add_argument("--float32", action="store_true", help="float32 MiniLM instead of int8")
    p.add_argument("--out", type=Path, default=Path(__file__).parent)
    p.add_argument("--model-dir", type=Path, help="all-MiniLM-L6-v2 folder (default: packaged)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from services.common.assets import minilm_dir

    spec = EmbedderSpec(max_tokens=args.max_tokens, int8=not args.float32)
    model, out = train(spec, args.model_dir or minilm_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "weights.npz")
    (args.out / "training_report.json").write_text(json.dumps(out, indent=1) + "\n")
    h, a = out["held_out_tier"], out["held_out_argmax"]
    print(f"l2={out['l2']} thresholds={out['thresholds']} train acc "
          f"{out['train_tier']['accuracy']:.3f}; held-out n={h['n']}: tier acc "
          f"{h['accuracy']:.3f} (argmax {a['accuracy']:.3f}), easy<->hard errors "
          f"{h['off_by_two']}")
    print("held-out per category:", {k: round(v, 2) for k, v in h["per_category"].items()})


if __name__ == "__main__":
    main()
