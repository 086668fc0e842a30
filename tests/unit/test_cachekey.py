"""cachekey is pure: scope, exact key, semantic text and bypass decisions, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.cachekey import (
    Directives,
    Rules,
    effective_threshold,
    parse_directives,
    plan,
    script_share,
    text_of,
)

RULES = Rules(scripts=frozenset({"latin"}), min_script_share=0.7)
BASE: dict[str, Any] = {
    "model": "deepseek-chat",
    "temperature": 0.2,
    "messages": [{"role": "system", "content": "You are terse."},
                 {"role": "user", "content": "What is the capital of France?"}],
}


def chat(body: dict[str, Any], tenant: str = "t1", directives: Directives | None = None) -> Any:
    return plan(body, tenant=tenant, route="chat", directives=directives or Directives(), rules=RULES)


def with_(**changes: Any) -> dict[str, Any]:
    return {**BASE, **changes}


SCOPE_CHANGES = {
    "model": with_(model="deepseek-reasoner"),
    "temperature": with_(temperature=0.7),
    "top_p": with_(top_p=0.5),
    "max_tokens": with_(max_tokens=10),
    "stop": with_(stop=["\n"]),
    "seed": with_(seed=7),
    "response_format": with_(response_format={"type": "json_object"}),
    "tools": with_(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    "tool_choice": with_(tool_choice="none"),
    "logit_bias": with_(logit_bias={"42": 5}),
    "unknown_param": with_(reasoning_effort="high"),
    "system_prompt": with_(messages=[{"role": "system", "content": "You are verbose."},
                                     BASE["messages"][1]]),
    "no_system_prompt": with_(messages=[BASE["messages"][1]]),
    "history": with_(messages=[BASE["messages"][0], {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello"}, BASE["messages"][1]]),
    "last_turn_name": with_(messages=[BASE["messages"][0], {**BASE["messages"][1], "name": "bob"}]),
}


@pytest.mark.parametrize("name", sorted(SCOPE_CHANGES))
def test_every_scope_field_partitions(name: str) -> None:
    assert chat(SCOPE_CHANGES[name]).scope != chat(BASE).scope


def test_tenant_partitions() -> None:
    assert chat(BASE, tenant="t2").scope != chat(BASE).scope


def test_delivery_fields_do_not_partition() -> None:
    streamed = with_(stream=True, stream_options={"include_usage": True}, user="u-123")
    assert chat(streamed).scope == chat(BASE).scope
    assert chat(streamed).key == chat(BASE).key


def test_integral_floats_equal_ints() -> None:
    assert chat(with_(temperature=1)).key == chat(with_(temperature=1.0)).key


def test_same_scope_different_question_differs_only_in_key() -> None:
    other = with_(messages=[BASE["messages"][0], {"role": "user", "content": "And of Spain?"}])
    assert chat(other).scope == chat(BASE).scope
    assert chat(other).key != chat(BASE).key
    assert chat(other).text == "And of Spain?"


def test_key_ignores_dict_order() -> None:
    reordered = dict(reversed(list(BASE.items())))
    assert chat(reordered).key == chat(BASE).key


@pytest.mark.parametrize(("body", "directives", "lookup", "store", "text", "reason"), [
    (BASE, Directives(), True, True, "What is the capital of France?", None),
    (BASE, Directives(no_cache=True), False, True, "What is the capital of France?", "no_cache"),
    (BASE, Directives(no_store=True), False, False, None, "no_store"),
    (with_(n=2), Directives(), False, False, None, "n_gt_1"),
    (with_(n=1), Directives(), True, True, "What is the capital of France?", None),
    (with_(messages=[{"role": "user", "content": "法国的首都是哪里？"}]), Directives(), True, True, None,
     "language"),
    (with_(messages=[{"role": "user", "content": "   "}]), Directives(), True, True, None, "empty"),
    (with_(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
     Directives(), True, True, None, "no_user_turn"),
    (with_(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "data:..."}}]}]), Directives(), True, True, None,
     "non_text"),
])
def test_bypass_table(body: dict[str, Any], directives: Directives, lookup: bool, store: bool,
                      text: str | None, reason: str | None) -> None:
    result = chat(body, directives=directives)
    assert (result.lookup, result.store, result.text, result.bypass) == (lookup, store, text, reason)


def test_semantic_off_rule() -> None:
    rules = Rules(scripts=frozenset({"latin"}), min_script_share=0.7, semantic=False)
    result = plan(BASE, tenant="t", route="chat", directives=Directives(), rules=rules)
    assert result.text is None and result.lookup and result.bypass == "semantic_off"


def test_completions_route() -> None:
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 5}
    one = plan(body, tenant="t", route="completions", directives=Directives(), rules=RULES)
    assert one.text == "Once upon a time"
    listed = plan({**body, "prompt": ["a", "b"]}, tenant="t", route="completions",
                  directives=Directives(), rules=RULES)
    assert listed.text is None and listed.bypass == "prompt_list"
    chat_like = chat({"model": "m", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "Once upon a time"}]})
    assert chat_like.scope != one.scope


@pytest.mark.parametrize(("header", "no_cache", "no_store"), [
    (None, False, False), ("no-cache", True, False), ("No-Store", False, True),
    ("max-age=0, no-cache, no-store", True, True), ("private", False, False),
])
def test_cache_control(header: str | None, no_cache: bool, no_store: bool) -> None:
    d = parse_directives(header, None)
    assert (d.no_cache, d.no_store) == (no_cache, no_store)


@pytest.mark.parametrize(("header", "expected"), [
    (None, 0.9), ("0.95", 0.95), ("0.5", 0.9), ("nan", 0.9), ("2", 0.9), ("abc", 0.9), ("-5", 0.9),
])
def test_threshold_header_only_tightens(header: str | None, expected: float) -> None:
    assert effective_threshold(0.9, parse_directives(None, header)) == expected


@pytest.mark.parametrize(("text", "share"), [
    ("hello world", 1.0), ("12345 !!", 1.0), ("你好", 0.0), ("hello 你好呀", 0.625), ("Привет", 0.0),
    ("café déjà vu", 1.0),
])
def test_script_share(text: str, share: float) -> None:
    assert script_share(text, frozenset({"latin"})) == pytest.approx(share)


def test_text_of() -> None:
    assert text_of("x") == "x"
    assert text_of([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]) == "a\nb"
    assert text_of([{"type": "image_url"}]) is None
    assert text_of(None) is None
