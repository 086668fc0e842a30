"""PURE: what a request may share with others.

The scope is a hard partition: tenant, route, model, every generation parameter (including
unknown ones), system prompts, tools and all earlier turns must match exactly before two requests
may share an answer. Inside a scope only the last user turn is compared, exactly (the exact key)
or by embedding similarity (the semantic text).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

# Fields that change how the answer is delivered or attributed, never what it says.
DELIVERY_FIELDS = frozenset({"stream", "stream_options", "user"})

# Letters of these scripts count as covered when the model's config names them.
_SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0000, 0x024F, "latin"),
    (0x0370, 0x03FF, "greek"),
    (0x0400, 0x052F, "cyrillic"),
    (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"),
    (0x1E00, 0x1EFF, "latin"),
    (0x3040, 0x30FF, "cjk"),
    (0x3400, 0x4DBF, "cjk"),
    (0x4E00, 0x9FFF, "cjk"),
    (0xAC00, 0xD7AF, "cjk"),
    (0xF900, 0xFAFF, "cjk"),
)


@dataclass(frozen=True, slots=True)
class Directives:
    """What the client asked of the cache (Cache-Control, threshold header)."""

    no_cache: bool = False   # skip the lookup, still store the answer
    no_store: bool = False   # neither look up nor store
    min_similarity: float | None = None  # may only make the threshold stricter


@dataclass(frozen=True, slots=True)
class Plan:
    scope: str
    key: str
    text: str | None         # semantic text; None means exact caching only
    lookup: bool
    store: bool
    bypass: str | None       # why lookup/store is off, or why semantic is off (bounded label)
    embedder: str | None = None  # id of the model that embeds ``text`` (None: the cache's default)


def parse_directives(cache_control: str | None, threshold: str | None) -> Directives:
    tokens = {t.strip().lower() for t in (cache_control or "").split(",")}
    min_similarity = None
    if threshold:
        try:
            value = float(threshold)
        except ValueError:
            value = float("nan")
        if value == value and -1.0 <= value <= 1.0:  # NaN fails the first comparison
            min_similarity = value
    return Directives(no_cache="no-cache" in tokens, no_store="no-store" in tokens,
                      min_similarity=min_similarity)


def effective_threshold(configured: float, directives: Directives) -> float:
    if directives.min_similarity is None:
        return configured
    return max(configured, directives.min_similarity)


def _normalise(value: Any) -> Any:
    # 1 and 1.0 mean the same temperature; JSON encoders disagree, so make them agree. Only
    # within 2**53 (exact in a float): 1e20 as an int would not fit the 64 bits orjson encodes
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def canonical_json(obj: Any) -> bytes:
    """Sorted-key JSON; falls back to the stdlib for what orjson refuses (integers past 64 bits
    are valid JSON and must not turn a request into an error)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass")


def _digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def text_of(content: Any) -> str | None:
    """The text of a message's content, or None when it holds anything but text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                return None
            text = part.get("text")
            if not isinstance(text, str):
                return None
            parts.append(text)
        return "\n".join(parts)
    return None


def script_share(text: str, scripts: frozenset[str]) -> float:
    """Share of the letters in ``text`` that belong to the given scripts (1.0 with no letters)."""
    if text.isascii():
        # every ASCII letter is Latin; this spares the per-character loop on most prompts
        return 1.0 if "latin" in scripts or not any(ch.isalpha() for ch in text) else 0.0
    letters = covered = 0
    for ch in text:
        if not ch.isalpha():
            continue
        letters += 1
        code = ord(ch)
        name = "other"
        for low, high, script in _SCRIPT_RANGES:
            if low <= code <= high:
                name = script
                break
        if name in scripts:
            covered += 1
    return 1.0 if letters == 0 else covered / letters


@dataclass(frozen=True, slots=True)
class Rules:
    scripts: frozenset[str]
    min_script_share: float
    semantic: bool = True
    #: id of the main embedding model; part of the scope, so vectors of two models never meet
    #: ("" keeps it out: one model only)
    embedder: str = ""
    #: (script, model id, threshold or None): a prompt mostly in that script goes to that model
    languages: tuple[tuple[str, str, float | None], ...] = ()
    #: (route, model id, its scripts, threshold or None): that route's main model instead
    routes: tuple[tuple[str, str, frozenset[str], float | None], ...] = ()

    def embedder_for(self, text: str, route: str) -> tuple[str, float | None] | None:
        """(model id, its own threshold) for a semantic text, or None when no configured
        model understands enough of its letters."""
        for script, model, threshold in self.languages:
            # a text without letters (digits, code symbols) is no language's: the main model's
            if (script_share(text, frozenset((script,))) >= self.min_script_share
                    and any(ch.isalpha() for ch in text)):
                return model, threshold
        model, scripts, threshold = self.embedder, self.scripts, None
        for name, routed, routed_scripts, routed_threshold in self.routes:
            if name == route:
                model, scripts, threshold = routed, routed_scripts, routed_threshold
        if script_share(text, scripts) >= self.min_script_share:
            return model, threshold
        return None

    def threshold_for(self, plan: Plan) -> float | None:
        """The threshold of the model that embeds the plan's text, when it has its own."""
        if plan.embedder is None:
            return None
        for _, model, threshold in self.languages:
            if model == plan.embedder and threshold is not None:
                return threshold
        for _, model, _, threshold in self.routes:
            if model == plan.embedder and threshold is not None:
                return threshold
        return None


def plan(body: Mapping[str, Any], *, tenant: str, route: str, directives: Directives,
         rules: Rules) -> Plan:
    """Scope, exact key and semantic text of a validated chat or completions request."""
    turns_field = "messages" if route == "chat" else "prompt"
    params = {k: _normalise(v) for k, v in body.items()
              if k not in DELIVERY_FIELDS and k != turns_field}
    turns = body.get(turns_field)
    scope_obj: dict[str, Any]
    if route == "chat":
        assert isinstance(turns, list)
        history, last = turns[:-1], dict(turns[-1])
        content = last.pop("content", None)
        scope_obj = {"t": tenant, "r": route, "p": params, "h": history, "l": last}
        text = text_of(content) if last.get("role") == "user" else None
        semantic_off = None if text is not None else (
            "no_user_turn" if last.get("role") != "user" else "non_text")
    else:
        content = turns
        scope_obj = {"t": tenant, "r": route, "p": params}
        text = turns if isinstance(turns, str) else None
        semantic_off = None if text is not None else "prompt_list"
    chosen = rules.embedder_for(text, route) if text is not None else None
    embedder = chosen[0] if chosen is not None and chosen[0] else None
    if embedder is not None:
        # a model change (or another model for this language) is another scope: its vectors
        # are never compared with the other model's
        scope_obj["e"] = embedder
    scope = _digest(scope_obj)
    key = _digest({"s": scope, "c": content})

    if directives.no_store:
        return Plan(scope, key, None, lookup=False, store=False, bypass="no_store")
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return Plan(scope, key, None, lookup=False, store=False, bypass="n_gt_1")
    if directives.no_cache:
        lookup, bypass = False, "no_cache"
    else:
        lookup, bypass = True, None
    if text is not None and not rules.semantic:
        text, semantic_off = None, "semantic_off"
    if text is not None and chosen is None:
        text, semantic_off = None, "language"
    if text is not None and not text.strip():
        text, semantic_off = None, "empty"
    return Plan(scope, key, text, lookup=lookup, store=True, bypass=bypass or semantic_off,
                embedder=embedder if text is not None else None)
