"""Guards refuse semantic hits through the real proxy, with the real model scoring the pairs.

Each refused pair below scores above the default threshold (0.97) with all-MiniLM-L6-v2, so
without the guard it would be served the other question's answer.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests  # type: ignore[import-untyped]


def ask(url: str, question: str) -> requests.Response:
    resp = requests.post(url + "/v1/chat/completions", timeout=30, json={
        "model": "deepseek-chat", "messages": [{"role": "user", "content": question}]})
    assert resp.status_code == 200, resp.text
    return resp


def guard_count(url: str, guard: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f'semcache_cache_guard_refusals_total{{guard="{guard}"}}'):
            return float(line.split()[-1])
    return 0.0


PAIRS = [
    ("negation", "Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?"),
    ("numbers", "What is the population of Canada in 2020?", "What is the population of Canada in 2021?"),
]


@pytest.mark.parametrize(("guard", "cached", "asked"), PAIRS, ids=[p[0] for p in PAIRS])
def test_guard_refuses_what_the_threshold_would_serve(make_proxy: Any, guard: str, cached: str,
                                                      asked: str) -> None:
    url = make_proxy()
    assert ask(url, cached).headers["x-semcache"] == "miss"
    refused = ask(url, asked)
    assert refused.headers["x-semcache"] == "miss"
    assert asked in refused.json()["choices"][0]["message"]["content"]
    assert guard_count(url, guard) == 1.0


@pytest.mark.parametrize(("guard", "cached", "asked"), PAIRS, ids=[p[0] for p in PAIRS])
def test_without_guards_the_threshold_alone_serves_the_wrong_answer(make_proxy: Any, guard: str,
                                                                     cached: str, asked: str) -> None:
    url = make_proxy(cache={"guards": []})
    ask(url, cached)
    served = ask(url, asked)
    assert served.headers["x-semcache"] == "semantic"
    assert cached in served.json()["choices"][0]["message"]["content"]


def test_time_sensitive_question_is_never_a_semantic_hit(make_proxy: Any) -> None:
    url = make_proxy()
    ask(url, "What is the latest version of Django?")
    assert ask(url, "What's the latest version of Django?").headers["x-semcache"] == "miss"
    # an exact repeat is still an exact hit: the guard only stops similarity
    assert ask(url, "What is the latest version of Django?").headers["x-semcache"] == "exact"
    assert guard_count(url, "time_sensitive") == 1.0
