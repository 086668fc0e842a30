"""PURE: what a similarity threshold costs and buys, from scores of labelled pairs.

A pair ``(query, cached)`` with label 1 (same meaning) or 0 is *served* at threshold ``t`` when
its score reaches ``t`` and no guard refused it. Per threshold:

* precision      TP / (TP + FP), the share of served hits that are right
* recall         TP / positives, the share of true paraphrases served
* false-hit rate FP / (TP + FP) = 1 - precision, the share of served hits that are wrong, with a
  95% Wilson score interval (it behaves at 0 and near 1, where the normal approximation lies)
* FPR            FP / negatives, the share of different-meaning pairs that are served

No I/O and no model here (numpy only), so the figures can be checked by hand in tests;
``proxy/calibrate.py`` does the embedding and the printing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Z95",
    "Row",
    "auc",
    "choose",
    "format_table",
    "row",
    "sweep",
    "wilson",
]

Z95 = 1.959963984540054
#: 0.80 ... 0.95 by 0.01, then by 0.005 to 0.995, then 0.996 ... 0.999: where cosine thresholds
#: of sentence embedders live (multilingual-e5's scores crowd above 0.9)
DEFAULT_THRESHOLDS: tuple[float, ...] = (
    *(round(0.80 + 0.01 * i, 3) for i in range(16)),
    *(round(0.955 + 0.005 * i, 3) for i in range(9)),
    *(round(0.996 + 0.001 * i, 3) for i in range(4)))

Scores = npt.NDArray[np.floating]
Labels = npt.NDArray[np.integer] | npt.NDArray[np.bool_]
Mask = npt.NDArray[np.bool_]


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion of ``k`` in ``n``; (0, 1) when ``n`` is 0."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class Row:
    threshold: float
    tp: int
    fp: int
    positives: int
    negatives: int

    @property
    def served(self) -> int:
        return self.tp + self.fp

    @property
    def precision(self) -> float:
        """NaN when nothing is served."""
        return self.tp / self.served if self.served else math.nan

    @property
    def recall(self) -> float:
        return self.tp / self.positives if self.positives else math.nan

    @property
    def false_hit_rate(self) -> float:
        """FP / (TP + FP); NaN when nothing is served."""
        return self.fp / self.served if self.served else math.nan

    @property
    def false_hit_ci(self) -> tuple[float, float]:
        return wilson(self.fp, self.served)

    @property
    def fpr(self) -> float:
        return self.fp / self.negatives if self.negatives else math.nan


def _arrays(scores: Scores | Sequence[float], labels: Labels | Sequence[int],
            refused: Mask | Sequence[bool] | None) -> tuple[Scores, Mask, Mask]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"scores and labels must be 1-D and of one length, got {s.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    r = np.zeros(s.shape, np.bool_) if refused is None else np.asarray(refused, dtype=np.bool_)
    if r.shape != s.shape:
        raise ValueError("refused must have one entry per pair")
    return s, y.astype(np.bool_), r


def row(threshold: float, scores: Scores | Sequence[float], labels: Labels | Sequence[int],
        refused: Mask | Sequence[bool] | None = None) -> Row:
    """Counts at one threshold; ``refused`` marks pairs a guard refuses whatever their score."""
    s, y, r = _arrays(scores, labels, refused)
    served = (s >= threshold) & ~r
    return Row(threshold=threshold, tp=int((served & y).sum()), fp=int((served & ~y).sum()),
               positives=int(y.sum()), negatives=int((~y).sum()))


def sweep(scores: Scores | Sequence[float], labels: Labels | Sequence[int],
          thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
          refused: Mask | Sequence[bool] | None = None) -> list[Row]:
    """One row per threshold, in the order given."""
    s, y, r = _arrays(scores, labels, refused)
    return [row(t, s, y, r) for t in thresholds]


def choose(rows: Sequence[Row], max_false_hit_rate: float, *, strict: bool = False) -> Row | None:
    """The row with the lowest threshold (so the most recall) whose false-hit rate is at most
    the target and that serves at least one hit, or None. With ``strict`` the upper end of the
    95% interval must meet the target, not just the point estimate."""
    ok = [r for r in rows if r.served and
          (r.false_hit_ci[1] if strict else r.false_hit_rate) <= max_false_hit_rate]
    return min(ok, key=lambda r: r.threshold) if ok else None


def auc(scores: Scores | Sequence[float], labels: Labels | Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); NaN without both labels."""
    s, y, _ = _arrays(scores, labels, None)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    ranks[order] = np.arange(1, len(s) + 1)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _pct(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.{digits}f}%"


def format_table(rows: Sequence[Row], *, markdown: bool = False) -> str:
    """The sweep as a fixed-width (or Markdown) table."""
    head = ("threshold", "served", "TP", "FP", "precision", "recall", "false hits", "95% CI", "FPR")
    lines = []
    for r in rows:
        lo, hi = r.false_hit_ci
        ci = f"[{100 * lo:.1f}, {100 * hi:.1f}]" if r.served else "-"
        lines.append((f"{r.threshold:.3f}".rstrip("0").rstrip("."), str(r.served), str(r.tp), str(r.fp),
                      _pct(r.precision), _pct(r.recall), _pct(r.false_hit_rate), ci, _pct(r.fpr, 2)))
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*cells) for cells in lines)])
