"""The verifier: a second look at the best semantic candidate before it is served.

The embedder's cosine says "same topic"; it cannot tell "How do I learn Python?" from "How do I
learn Python *fast*?", because the one word that changes the answer barely moves a sentence
vector. After FAISS found a candidate above the (lowered) cosine threshold and the guards passed
it, the verifier scores the pair with a small learned model over cheap pairwise features and the
hit is served only when the probability of "same meaning" reaches the model's operating point.

Features (per language; :data:`FEATURES` names them, the model file says which version it was
trained on, and a file of another version is refused at load):

* ``en-1``: the cosine; IDF-weighted overlap of content words (IDF table from the training
  corpus, shipped in the model file); the largest IDF of a content word found on one side only
  (the "*fast*" above) and the IDF mass on each side only; length ratio and the shorter length;
  word-bigram and character-trigram overlap; whether the question words (what/how/why ...) or
  the first words differ; function words that differ ("to" / "from"); the guards' own findings
  (numbers, negation, opposites, names, order, "today").
* ``zh-1``: the cosine (multilingual-e5); character and character-bigram overlap, IDF-weighted
  character overlap and the rarest character on one side only; length ratio; negation
  (不/没/没有/别/未/无) and order findings of the Chinese guards; numbers.

The model is a one-hidden-layer network (a few hundred weights) evaluated with numpy: about
30-60 µs per check, most of it feature extraction, which reuses the guards' memoised analysis.
Weights, standardisation, IDF table, operating point and provenance (split, command, date) live
in ``verifier_<lang>.json`` beside this module; ``bench/train_verifier.py`` writes them and
never sees the held-out splits. Pure: no I/O except :func:`load`, which the composition root and
the measuring tools call.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Hashable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import guards as g
from .config import Config

__all__ = [
    "FEATURES",
    "Verifier",
    "VerifierModel",
    "build",
    "cjk_share",
    "default_paths",
    "features",
    "language_of",
    "load",
]

Floats = npt.NDArray[np.float64]

#: feature names per feature-set version (a model file names its version; order matters)
FEATURES: dict[str, tuple[str, ...]] = {
    "en-1": ("cosine", "idf_overlap", "idf_only_query_max", "idf_only_cached_max", "idf_only_share",
             "only_query", "only_cached", "length_ratio", "bigram_overlap", "trigram_overlap",
             "question_word_differs", "numbers", "negation", "antonyms", "entities", "order",
             "time_sensitive", "function_words_differ", "same_content", "idf_only_query_sum",
             "idf_only_cached_sum", "min_words", "first_word_same"),
    "zh-1": ("cosine", "char_overlap", "bigram_overlap", "idf_overlap", "idf_only_query_max",
             "idf_only_cached_max", "only_query", "only_cached", "length_ratio", "negation",
             "order", "numbers", "same_chars"),
}

_QUESTION_WORDS = frozenset(["what", "how", "why", "when", "where", "which", "who", "whom", "whose"])
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def cjk_share(text: str) -> float:
    """The share of a text's letters (CJK ideographs and Latin letters) that are CJK."""
    cjk = len(_CJK.findall(text))
    if not cjk:
        return 0.0
    latin = sum(1 for ch in text if ch.isascii() and ch.isalpha())
    return cjk / (cjk + latin)


def language_of(text: str) -> str:
    """"zh" when most letters are CJK ideographs, else "en" (the only two with a model)."""
    return "zh" if cjk_share(text) >= 0.5 else "en"


def _jaccard(a: AbstractSet[Hashable], b: AbstractSet[Hashable]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def _grams(text: str, n: int) -> set[str]:
    return {text[i:i + n] for i in range(len(text) - n + 1)} if len(text) >= n else {text}


def _idf_terms(mine: frozenset[str], theirs: frozenset[str], idf: Mapping[str, float],
               unknown: float) -> tuple[float, float, float, float, float, float]:
    """(overlap, rarest only in mine, rarest only in theirs, share of IDF mass on one side, IDF
    mass only in mine, only in theirs)."""
    shared = sum(idf.get(t, unknown) for t in mine & theirs)
    only_mine = [idf.get(t, unknown) for t in mine - theirs]
    only_theirs = [idf.get(t, unknown) for t in theirs - mine]
    total = shared + sum(only_mine) + sum(only_theirs)
    if not total:
        return 1.0, 0.0, 0.0, 0.0, 0.0, 0.0
    return (shared / total, max(only_mine, default=0.0), max(only_theirs, default=0.0),
            (total - shared) / total, sum(only_mine), sum(only_theirs))


def _near_keys(keys: frozenset[str], other: frozenset[str]) -> frozenset[str]:
    """Content keys with a word of the other side sharing their first five letters counted as
    shared ("vaccination" / "vaccine" stay apart, "democracies" / "democracy" meet)."""
    stems = {k[:5] for k in other if len(k) >= 5}
    return frozenset(k if (k in other or len(k) < 5 or k[:5] not in stems) else
                     next(o for o in other if o[:5] == k[:5]) for k in keys)


@dataclass(frozen=True, slots=True)
class _Read:
    """What the English features read from one prompt beyond the guards' analysis (memoised:
    the query is checked against up to top_k candidates, a candidate again and again)."""

    analysis: g.Analysis
    words: tuple[str, ...]
    bigrams: frozenset[tuple[str, str]]
    trigrams: frozenset[str]
    question_words: frozenset[str]
    function_words: frozenset[str]


@functools.lru_cache(maxsize=2048)
def _read(text: str) -> _Read:
    a = g.analyse(text)
    words = tuple(w.lower() for w in a.words)
    flat = re.sub(r"\s+", " ", text.lower().strip())
    return _Read(analysis=a, words=words, bigrams=frozenset(itertools.pairwise(words)),
                 trigrams=frozenset(_grams(flat, 3)), question_words=_QUESTION_WORDS.intersection(words),
                 function_words=a.word_keys - a.content_keys)


def _english(query: str, candidate: str, cosine: float, idf: Mapping[str, float],
             unknown: float) -> list[float]:
    ra, rb = _read(query), _read(candidate)
    a, b = ra.analysis, rb.analysis
    kb = b.content_keys
    ka = _near_keys(a.content_keys, kb)
    overlap, only_a_max, only_b_max, only_share, only_a_sum, only_b_sum = _idf_terms(ka, kb, idf, unknown)
    la, lb = len(ra.words), len(rb.words)
    return [
        cosine, overlap, only_a_max, only_b_max, only_share,
        min(len(ka - kb), 5.0), min(len(kb - ka), 5.0),
        min(la, lb) / max(la, lb, 1),
        _jaccard(ra.bigrams, rb.bigrams),
        _jaccard(ra.trigrams, rb.trigrams),
        float(ra.question_words != rb.question_words),
        *(float(g.on_analyses(name, a, b)) for name in
          ("numbers", "negation", "antonyms", "entities", "order", "time_sensitive")),
        min(len(ra.function_words ^ rb.function_words), 5.0),
        float(a.content == b.content),
        min(only_a_sum, 30.0), min(only_b_sum, 30.0), min(la, lb, 40),
        float(ra.words[:1] == rb.words[:1]),
    ]


def _chinese(query: str, candidate: str, cosine: float, idf: Mapping[str, float],
             unknown: float) -> list[float]:
    a, b = g.analyse(query), g.analyse(candidate)
    ca, cb = a.han, b.han
    sa, sb = frozenset(ca), frozenset(cb)
    overlap, only_a_max, only_b_max, *_ = _idf_terms(sa, sb, idf, unknown)
    return [
        cosine, _jaccard(sa, sb), _jaccard(_grams(ca, 2), _grams(cb, 2)), overlap,
        only_a_max, only_b_max, min(len(sa - sb), 5.0), min(len(sb - sa), 5.0),
        min(len(ca), len(cb)) / max(len(ca), len(cb), 1),
        float(g.on_analyses("negation", a, b)), float(g.on_analyses("order", a, b)),
        float(g.on_analyses("numbers", a, b)), float(ca == cb),
    ]


_EXTRACTORS = {"en-1": _english, "zh-1": _chinese}


def features(version: str, query: str, candidate: str, cosine: float, idf: Mapping[str, float],
             unknown_idf: float) -> list[float]:
    """The feature vector of one pair (``FEATURES[version]`` names its entries)."""
    return _EXTRACTORS[version](query, candidate, cosine, idf, unknown_idf)


@dataclass(frozen=True)
class VerifierModel:
    """One trained model: a language, the embedder whose cosines it was trained on, a feature
    set, the network and its operating point (``min_probability``, chosen on the tuning split)."""

    language: str
    embedder: str
    feature_set: str
    mean: Floats
    scale: Floats
    w1: Floats
    b1: Floats
    w2: Floats
    b2: float
    idf: Mapping[str, float]
    unknown_idf: float
    min_probability: float
    min_similarity: float
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def features(self, query: str, candidate: str, cosine: float) -> list[float]:
        return features(self.feature_set, query, candidate, cosine, self.idf, self.unknown_idf)

    def probability(self, query: str, candidate: str, cosine: float) -> float:
        """P(same meaning) for the new prompt ``query`` against the cached ``candidate``."""
        return float(self.predict(np.asarray([self.features(query, candidate, cosine)]))[0])

    def predict(self, x: Floats) -> Floats:
        """P(same meaning) for rows of features (the trainer and the evaluation use this)."""
        hidden = np.tanh(((x - self.mean) / self.scale) @ self.w1 + self.b1)
        return 1.0 / (1.0 + np.exp(-(hidden @ self.w2 + self.b2)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VerifierModel:
        version = data["feature_set"]
        if version not in FEATURES:
            raise ValueError(f"verifier feature set {version!r} is not implemented here "
                             f"(known: {', '.join(FEATURES)}); retrain with bench/train_verifier.py")
        width = len(FEATURES[version])
        w1 = np.asarray(data["w1"], np.float64)
        if w1.shape[0] != width or len(data["mean"]) != width:
            raise ValueError(f"verifier weights do not fit the {width} features of {version}")
        point = data["operating_point"]
        return cls(language=data["language"], embedder=data["embedder"], feature_set=version,
                   mean=np.asarray(data["mean"], np.float64), scale=np.asarray(data["scale"], np.float64),
                   w1=w1, b1=np.asarray(data["b1"], np.float64), w2=np.asarray(data["w2"], np.float64),
                   b2=float(data["b2"]), idf=dict(data["idf"]), unknown_idf=float(data["unknown_idf"]),
                   min_probability=float(point["min_probability"]),
                   min_similarity=float(point["min_similarity"]),
                   provenance=dict(data.get("provenance", {})))

    def to_dict(self) -> dict[str, Any]:
        def rounded(values: Floats) -> Any:
            return np.round(values, 6).tolist()

        return {"language": self.language, "embedder": self.embedder, "feature_set": self.feature_set,
                "features": list(FEATURES[self.feature_set]), "provenance": dict(self.provenance),
                "operating_point": {"min_probability": self.min_probability,
                                    "min_similarity": self.min_similarity},
                "mean": rounded(self.mean), "scale": rounded(self.scale), "w1": rounded(self.w1),
                "b1": rounded(self.b1), "w2": rounded(self.w2), "b2": round(self.b2, 6),
                "unknown_idf": round(self.unknown_idf, 3),
                "idf": {k: round(v, 2) for k, v in sorted(self.idf.items())}}


def load(path: str | Path) -> VerifierModel:
    """Read a model file written by ``bench/train_verifier.py``."""
    with open(path, encoding="utf-8") as f:
        return VerifierModel.from_dict(json.load(f))


def default_paths() -> tuple[Path, ...]:
    """The model files shipped beside this module (one per language)."""
    return tuple(sorted(Path(__file__).resolve().parent.glob("verifier_*.json")))


class Verifier:
    """The models in force, by (embedder, language): a candidate is judged by the model trained
    on the cosines of the embedder that produced its score, for the language of the query. A
    pair no model covers is not judged (``score`` returns None): its cosine threshold alone
    decides, so a model trained on one embedder's scale never judges another's."""

    def __init__(self, models: Iterable[VerifierModel], *, default_embedder: str,
                 min_probability: Mapping[Any, float] | None = None) -> None:
        self._models = {(m.embedder, m.language): m for m in models}
        self._default = default_embedder
        self._min: dict[str, float] = {str(k): float(p) for k, p in (min_probability or {}).items()}

    @property
    def models(self) -> tuple[VerifierModel, ...]:
        return tuple(self._models.values())

    def model_for(self, query: str, embedder: str | None) -> VerifierModel | None:
        return self._models.get((embedder or self._default, language_of(query)))

    def threshold(self, model: VerifierModel) -> float:
        return self._min.get(model.language, model.min_probability)

    def score(self, query: str, candidate: str, cosine: float, embedder: str | None) -> float | None:
        """P(same meaning), or None when no model covers this embedder and language."""
        model = self.model_for(query, embedder)
        return None if model is None else model.probability(query, candidate, cosine)

    def refuses(self, query: str, candidate: str, cosine: float, embedder: str | None) -> bool:
        model = self.model_for(query, embedder)
        if model is None:
            return False
        return model.probability(query, candidate, cosine) < self.threshold(model)


def build(config: Config) -> Verifier:
    """The verifier the configuration asks for (``cache.verifier``); a model file that cannot be
    read raises (OSError, ValueError), so a start with a broken file fails loudly."""
    paths = config.cache.verifier.models or default_paths()
    return Verifier([load(p) for p in paths], default_embedder=config.embedding.ident,
                    min_probability=config.cache.verifier.min_probability)
