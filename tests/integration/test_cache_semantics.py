"""Cache semantics through a real proxy (real MiniLM model, real FAISS) in front of the fake upstream.

What DESIGN.md section 4 promises a client: scopes that similarity never crosses, the bypass
directives, a write gate that never keeps an error or a truncated answer, a threshold header that
only tightens, the language guard, unbuffered streaming, honest metrics and fresh ids on replay.

Every test builds its own proxy (a fresh store), so fixed questions give fixed similarity scores;
the fake upstream is shared, so tests count its calls as differences.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import FakeUpstream
from proxy.embedding import SentenceEmbedder
from tests.conftest import ServerLoop

Upstream = tuple[FakeUpstream, str]

KEY_A = "sk-tenant-a"
KEY_B = "sk-tenant-b"
MODEL = "deepseek-chat"

# Similarities measured with the packaged all-MiniLM-L6-v2 (cosine of normalised embeddings).
PY_Q = "How do I reverse a list in Python?"
PY_PARA = "How can I reverse a list in Python?"              # 0.998 to PY_Q
CAPITAL = "What is the capital city of France?"
CAPITAL_PARA = "France's capital is which city?"              # 0.921 to CAPITAL
CAPITAL_FAR = "Name the capital of France, please."           # 0.887 to CAPITAL
SPIDER_ZH = "蜘蛛有几条腿？"                                   # how many legs does a spider have?
ANT_ZH = "蚂蚁有几条腿？"                                      # how many legs does an ant have?


# -- helpers ------------------------------------------------------------------------------------


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def chat(url: str, question: str | None = None, *, key: str = KEY_A, headers: dict[str, str] | None = None,
         **body: Any) -> requests.Response:
    """POST /v1/chat/completions with plain HTTP; ``question`` becomes a single user turn."""
    payload: dict[str, Any] = {"model": MODEL}
    if question is not None:
        payload["messages"] = [user(question)]
    payload.update(body)
    sent = {"Authorization": f"Bearer {key}", **(headers or {})}
    resp = requests.post(url + "/v1/chat/completions", json=payload, headers=sent, timeout=30,
                         stream=bool(payload.get("stream")))
    if payload.get("stream"):
        resp.content  # noqa: B018 - read the whole stream before returning
    return resp


def state(resp: requests.Response) -> str:
    return resp.headers.get("x-semcache", "")


def content(resp: requests.Response) -> str:
    return str(resp.json()["choices"][0]["message"]["content"])


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    text = requests.get(url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(url: str, name: str, **labels: str) -> float:
    """One sample's value (0 when it was never touched, as Prometheus reads a missing series)."""
    return metrics(url).get((name, tuple(sorted(labels.items()))), 0.0)


def stores_attempted(url: str) -> float:
    """Answers offered to the cache so far, whatever the outcome."""
    return sum(v for (name, _), v in metrics(url).items() if name == "semcache_cache_store_total")


def wait_for_stores(url: str, count: float, timeout: float = 10.0) -> None:
    """Stores run in the background after the answer is sent; wait until ``count`` were tried."""
    deadline = time.monotonic() + timeout
    while stores_attempted(url) < count:
        assert time.monotonic() < deadline, f"only {stores_attempted(url)} of {count} stores ran"
        time.sleep(0.01)


def entries(url: str) -> int:
    stats = requests.get(url + "/admin/cache/stats", timeout=10).json()
    return int(stats["entries"])


@pytest.fixture
def fake(upstream: Upstream) -> FakeUpstream:
    return upstream[0]


# -- 1. scope isolation -------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look something up",
                                           "parameters": {"type": "object", "properties": {}}}}]

SCOPE_VARIANTS: dict[str, dict[str, Any]] = {
    "model": {"model": "deepseek-reasoner"},
    "temperature": {"temperature": 0.2},
    "system prompt": {"messages": [{"role": "system", "content": "You answer like a pirate."},
                                   user(PY_Q)]},
    "tools": {"tools": TOOLS},
    "earlier history": {"messages": [user("Hi!"), {"role": "assistant", "content": "Hello!"},
                                     user(PY_Q)]},
    "tenant": {"key": KEY_B},
}


@pytest.mark.parametrize("variant", list(SCOPE_VARIANTS))
def test_same_question_in_another_scope_is_a_miss(make_proxy: Any, fake: FakeUpstream, variant: str) -> None:
    url = make_proxy()
    first = chat(url, PY_Q)
    assert first.status_code == 200 and state(first) == "miss"
    wait_for_stores(url, 1)

    before = fake.calls
    other = chat(url, PY_Q, **SCOPE_VARIANTS[variant])
    assert other.status_code == 200
    assert state(other) == "miss", f"{variant}: {state(other)}"
    assert fake.calls == before + 1, variant

    # the control (same everything) is an exact hit, and the variant got its own entry
    control = chat(url, PY_Q)
    assert state(control) == "exact" and content(control) == content(first)
    wait_for_stores(url, 2)
    again = chat(url, PY_Q, **SCOPE_VARIANTS[variant])
    assert state(again) == "exact"
    assert fake.calls == before + 1


def test_equal_numbers_share_a_scope(make_proxy: Any, fake: FakeUpstream) -> None:
    """temperature 1 and 1.0 are one setting, so they share answers (and 1.5 does not)."""
    url = make_proxy()
    assert state(chat(url, PY_Q, temperature=1)) == "miss"
    wait_for_stores(url, 1)
    before = fake.calls
    assert state(chat(url, PY_Q, temperature=1.0)) == "exact"
    assert state(chat(url, PY_Q, temperature=1.5)) == "miss"
    assert fake.calls == before + 1


def test_semantic_hit_stays_inside_its_scope(make_proxy: Any, fake: FakeUpstream) -> None:
    url = make_proxy(cache={"threshold": 0.9})
    original = chat(url, PY_Q)
    assert state(original) == "miss"
    wait_for_stores(url, 1)
    before = fake.calls

    # the paraphrase scores 0.998 against the stored question, but only its own scope may see it
    other_tenant = chat(url, PY_PARA, key=KEY_B)
    other_model = chat(url, PY_PARA, model="deepseek-reasoner")
    assert state(other_tenant) == "miss" and state(other_model) == "miss"
    assert "x-semcache-similarity" not in other_tenant.headers
    assert fake.calls == before + 2
    assert content(other_tenant) != content(original)

    same_scope = chat(url, PY_PARA)
    assert state(same_scope) == "semantic"
    assert float(same_scope.headers["x-semcache-similarity"]) >= 0.99
    assert content(same_scope) == content(original)
    assert fake.calls == before + 2


# -- 2. bypass ----------------------------------------------------------------------------------


def test_no_cache_skips_lookup_but_stores(make_proxy: Any, fake: FakeUpstream) -> None:
    url = make_proxy()
    before = fake.calls
    first = chat(url, PY_Q, headers={"Cache-Control": "no-cache"})
    assert first.status_code == 200 and state(first) == "bypass"
    # asked again at once, it is answered from the cache (see the xfail below for how)
    right_away = chat(url, PY_Q)
    assert state(right_away) in ("exact", "semantic") and content(right_away) == content(first)
    wait_for_stores(url, 1)
    assert metric(url, "semcache_cache_store_total", outcome="stored") == 1

    plain = chat(url, PY_Q)
    assert state(plain) == "exact" and content(plain) == content(first)
    assert fake.calls == before + 1

    # the answer is cached now, yet no-cache still goes to the upstream
    again = chat(url, PY_Q, headers={"Cache-Control": "no-cache"})
    assert state(again) == "bypass"
    assert fake.calls == before + 2
    assert metric(url, "semcache_cache_bypass_total", reason="no_cache") == 2


def test_no_cache_answer_is_an_exact_hit_right_away(make_proxy: Any, fake: FakeUpstream) -> None:
    """Read your own write: what a plain miss already gives (tests/e2e asks again right away and
    gets an exact hit, because the lookup's vector makes the store instant), no-cache must give too."""
    url = make_proxy()
    before = fake.calls
    questions = [f"Which refresh comes first, question {i}?" for i in range(5)]
    for question in questions:
        refreshed = chat(url, question, headers={"Cache-Control": "no-cache"})
        assert state(refreshed) == "bypass"
        assert state(chat(url, question)) == "exact", question
    assert fake.calls == before + len(questions)


def test_no_store_neither_looks_up_nor_stores(make_proxy: Any, fake: FakeUpstream) -> None:
    url = make_proxy()
    before = fake.calls
    first = chat(url, PY_Q, headers={"Cache-Control": "no-store"})
    assert first.status_code == 200 and state(first) == "bypass"
    plain = chat(url, PY_Q)  # nothing was stored, so this is a miss (and it is stored)
    assert state(plain) == "miss"
    assert fake.calls == before + 2
    wait_for_stores(url, 1)
    assert state(chat(url, PY_Q)) == "exact"

    # a cached answer is not looked up under no-store either
    skipped = chat(url, PY_Q, headers={"Cache-Control": "no-store"})
    assert state(skipped) == "bypass"
    assert fake.calls == before + 3
    assert metric(url, "semcache_cache_store_total", outcome="stored") == 1
    assert entries(url) == 1
    assert metric(url, "semcache_cache_bypass_total", reason="no_store") == 2


def test_n_greater_than_one_is_bypass_and_not_stored(make_proxy: Any, fake: FakeUpstream) -> None:
    url = make_proxy()
    before = fake.calls
    for _ in range(2):
        resp = chat(url, PY_Q, n=2)
        assert resp.status_code == 200 and state(resp) == "bypass"
    assert fake.calls == before + 2
    assert entries(url) == 0
    assert stores_attempted(url) == 0
    assert metric(url, "semcache_cache_bypass_total", reason="n_gt_1") == 2
    assert metric(url, "semcache_cache_lookups_total", result="bypass") == 2


# -- 3. write gate ------------------------------------------------------------------------------

# fault -> (stream?, status the client sees, store outcome the gate reports, if it is offered)
WRITE_GATE: dict[str, tuple[bool, int, str | None]] = {
    "length": (False, 200, "finish_reason"),
    "toolcall": (False, 200, "finish_reason"),   # finish_reason tool_calls is not in the allowed set
    "500": (False, 500, None),
    "429": (False, 429, None),
    "garbage": (False, 200, None),
    "stream-length": (True, 200, "finish_reason"),
    "break": (True, 200, None),
    "nodone": (True, 200, None),
    "error_event": (True, 200, None),
}


@pytest.mark.parametrize("case", list(WRITE_GATE))
def test_write_gate_never_keeps_bad_answers(make_proxy: Any, fake: FakeUpstream, case: str) -> None:
    stream, status, outcome = WRITE_GATE[case]
    fault = case.removeprefix("stream-")
    url = make_proxy()
    question = f"Tell me about gates FAULT:{fault}"
    before = fake.calls
    for attempt in range(2):  # the second attempt must reach the upstream again
        resp = chat(url, question, stream=stream)
        assert resp.status_code == status, resp.text[:200]
        assert fake.calls == before + attempt + 1, case
        if stream and fault != "length":
            # a broken stream ends with an error event the SDK raises on, never a silent [DONE]
            assert b'"error"' in resp.content and not resp.content.rstrip().endswith(b"[DONE]")
        if outcome is not None:
            wait_for_stores(url, attempt + 1)
    assert metric(url, "semcache_cache_store_total", outcome="stored") == 0
    if outcome is not None:
        assert metric(url, "semcache_cache_store_total", outcome=outcome) == 2
    else:
        assert stores_attempted(url) == 0
    assert entries(url) == 0
    assert metric(url, "semcache_cache_entries") == 0


def test_tool_call_answers_are_refused_even_when_their_finish_reason_is_allowed(
        make_proxy: Any, fake: FakeUpstream) -> None:
    url = make_proxy(cache={"store_finish_reasons": ["stop", "tool_calls"]})
    before = fake.calls
    for attempt in range(2):
        resp = chat(url, "Look this up FAULT:toolcall", tools=TOOLS)
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["tool_calls"]
        wait_for_stores(url, attempt + 1)
    assert fake.calls == before + 2
    assert metric(url, "semcache_cache_store_total", outcome="tool_calls") == 2
    assert entries(url) == 0


def test_answers_over_the_size_cap_are_not_stored(make_proxy: Any, fake: FakeUpstream) -> None:
    url = make_proxy(cache={"max_entry_bytes": 256})  # every answer of the fake is larger
    before = fake.calls
    for attempt in range(2):
        resp = chat(url, PY_Q)
        assert resp.status_code == 200 and len(resp.content) > 256
        wait_for_stores(url, attempt + 1)
    assert fake.calls == before + 2
    assert metric(url, "semcache_cache_store_total", outcome="too_large") == 2
    assert entries(url) == 0


def test_broken_stream_is_an_error_in_the_sdk(proxy: str) -> None:
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=KEY_A, max_retries=0)
    with pytest.raises(openai.APIError):
        for _chunk in client.chat.completions.create(model=MODEL, stream=True,
                                                     messages=[user("Story FAULT:nodone")]):
            pass


# -- 4. threshold header ------------------------------------------------------------------------


def test_threshold_header_only_tightens(make_proxy: Any, fake: FakeUpstream) -> None:
    url = make_proxy(cache={"threshold": 0.9})
    # three tenants, three scopes, each seeded with the same question
    tenants = ("sk-strict", "sk-plain", "sk-loose")
    for key in tenants:
        assert state(chat(url, CAPITAL, key=key)) == "miss"
    wait_for_stores(url, 3)
    before = fake.calls

    plain = chat(url, CAPITAL_PARA, key="sk-plain")
    assert state(plain) == "semantic"
    score = float(plain.headers["x-semcache-similarity"])
    assert 0.9 <= score < 0.99, score

    strict = chat(url, CAPITAL_PARA, key="sk-strict", headers={"x-semcache-threshold": "0.99"})
    assert state(strict) == "miss"
    assert fake.calls == before + 1

    # 0.887 is below the configured 0.9: a header of 0.5 must not turn that into a hit
    loose = chat(url, CAPITAL_FAR, key="sk-loose", headers={"x-semcache-threshold": "0.5"})
    assert state(loose) == "miss"
    assert fake.calls == before + 2


# -- 5. language guard --------------------------------------------------------------------------


def test_language_guard_keeps_exact_and_refuses_semantic(
        make_proxy: Any, fake: FakeUpstream, embedder: SentenceEmbedder, servers: ServerLoop) -> None:
    # MiniLM reads these two different questions as one (mostly unknown tokens); the embedder
    # lives on the servers' loop, so it is asked there
    vectors = servers.run(embedder.embed([SPIDER_ZH, ANT_ZH])).vectors
    assert float(np.dot(vectors[0], vectors[1])) > 0.9

    url = make_proxy(cache={"threshold": 0.9})
    before = fake.calls
    first = chat(url, SPIDER_ZH)
    assert state(first) == "miss"
    wait_for_stores(url, 1)
    second = chat(url, SPIDER_ZH)
    assert state(second) == "exact" and content(second) == content(first)
    other = chat(url, ANT_ZH)
    assert state(other) == "miss"
    assert ANT_ZH in content(other)
    assert fake.calls == before + 2
    assert metric(url, "semcache_cache_bypass_total", reason="language") == 3


# -- 6. streaming is not buffered ---------------------------------------------------------------


@pytest.fixture
def slow_chunks(fake: FakeUpstream) -> Iterator[float]:
    saved = fake.chunk_delay_s
    fake.chunk_delay_s = 0.05
    yield fake.chunk_delay_s
    fake.chunk_delay_s = saved


def test_streamed_miss_is_relayed_as_it_arrives(proxy: str, slow_chunks: float) -> None:
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=KEY_A, max_retries=0)
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, stream=True, messages=[user("Explain streaming, slowly.")])
    assert raw.headers["x-semcache"] == "miss"
    arrivals, parts = [], []
    for chunk in raw.parse():
        arrivals.append(time.monotonic() - started)
        parts.extend(choice.delta.content or "" for choice in chunk.choices)
    total = time.monotonic() - started
    assert "Explain streaming, slowly." in "".join(parts)
    assert len(arrivals) > 10
    assert total >= 10 * slow_chunks
    assert arrivals[0] < total / 2, (arrivals[0], total)
    # chunks trickle in: most arrive well apart from the first
    assert arrivals[len(arrivals) // 2] - arrivals[0] > 3 * slow_chunks, arrivals


# -- 7. metrics after a scripted mix ------------------------------------------------------------


def test_metrics_after_a_scripted_mix(make_proxy: Any, fake: FakeUpstream) -> None:
    url = make_proxy()
    before = fake.calls
    miss = chat(url, PY_Q)
    assert state(miss) == "miss"
    wait_for_stores(url, 1)
    exact = chat(url, PY_Q)
    semantic = chat(url, PY_PARA)
    bypass = chat(url, PY_Q, headers={"Cache-Control": "no-store"})
    assert [state(r) for r in (miss, exact, semantic, bypass)] == ["miss", "exact", "semantic", "bypass"]
    assert fake.calls == before + 2

    m = metrics(url)

    def value(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    for result, count in (("miss", 1), ("exact", 1), ("semantic", 1), ("bypass", 1)):
        assert value("semcache_cache_lookups_total", result=result) == count, result
    assert value("semcache_requests_total", route="chat", status_class="2xx") == 4
    assert sum(v for (name, _), v in m.items() if name == "semcache_requests_total") == 4
    for result in ("miss", "exact", "semantic", "bypass"):
        assert value("semcache_request_duration_seconds_count", route="chat", result=result) == 1

    served = [r.json()["usage"] for r in (exact, semantic)]
    fetched = [r.json()["usage"] for r in (miss, bypass)]
    for kind in ("prompt", "completion"):
        saved = sum(u[f"{kind}_tokens"] for u in served)
        spent = sum(u[f"{kind}_tokens"] for u in fetched)
        assert saved > 0 and spent > 0
        assert value("semcache_tokens_total", kind=kind, source="cache") == saved, kind
        assert value("semcache_tokens_total", kind=kind, source="backend") == spent, kind

    assert value("semcache_cache_store_total", outcome="stored") == 1
    assert sum(v for (name, _), v in m.items() if name == "semcache_cache_store_total") == 1
    assert value("semcache_cache_bypass_total", reason="no_store") == 1
    assert sum(v for (name, _), v in m.items() if name == "semcache_cache_bypass_total") == 1
    assert value("semcache_cache_entries") == 1
    assert value("semcache_cache_bytes") > 0
    assert value("semcache_cache_similarity_count", outcome="hit") == 1
    assert value("semcache_cache_similarity_sum", outcome="hit") == pytest.approx(
        float(semantic.headers["x-semcache-similarity"]), abs=1e-4)
    assert value("semcache_cache_similarity_count", outcome="miss") == 0
    assert value("semcache_backend_request_duration_seconds_count", backend="fake", status_class="2xx") == 2


# -- 8. replay ----------------------------------------------------------------------------------


def test_replay_has_fresh_id_and_created_and_the_original_usage(make_proxy: Any) -> None:
    url = make_proxy()
    original = chat(url, PY_Q)
    assert state(original) == "miss"
    wait_for_stores(url, 1)
    first = original.json()
    time.sleep(1.05)  # let the clock move on so a copied `created` would show

    low = int(time.time())
    replays = [chat(url, PY_Q), chat(url, PY_PARA)]
    high = int(time.time())
    assert [state(r) for r in replays] == ["exact", "semantic"]
    ids = {first["id"]}
    for resp in replays:
        body = resp.json()
        assert body["id"].startswith("chatcmpl-") and body["id"] not in ids
        ids.add(body["id"])
        assert low <= body["created"] <= high and body["created"] > first["created"]
        assert body["usage"] == first["usage"]
        assert body["choices"] == first["choices"]
        assert body["model"] == first["model"] and body["object"] == "chat.completion"


def test_streamed_replay_has_fresh_id_and_the_original_usage(make_proxy: Any) -> None:
    url = make_proxy()
    original = chat(url, PY_Q).json()
    wait_for_stores(url, 1)
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY_A, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, stream=True, stream_options={"include_usage": True}, messages=[user(PY_Q)])
    assert raw.headers["x-semcache"] == "exact"
    chunks = list(raw.parse())
    assert {c.id for c in chunks} != {original["id"]} and len({c.id for c in chunks}) == 1
    text = "".join(choice.delta.content or "" for c in chunks for choice in c.choices)
    assert text == original["choices"][0]["message"]["content"]
    usage = chunks[-1].usage
    assert usage is not None and usage.model_dump(exclude_none=True) == original["usage"]
