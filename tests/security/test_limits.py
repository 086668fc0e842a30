"""Invariant 7: bounded resources and load shedding. Beyond a ceiling the proxy answers quickly
(503 or 429 with Retry-After) instead of queueing without bound; the cache keeps at most
cache.max_entries answers; metric label sets stay bounded whatever clients send.

Elsewhere: the body-size ceiling (413) in tests/integration/test_bad_input.py and
tests/security/test_hostile_input.py; the batch queue's 503 in tests/integration/test_batcher.py.
"""

from __future__ import annotations

import asyncio
import random
import string
import threading
import time
from typing import Any

import aiohttp
import orjson
import requests

from tests.security.conftest import LenientUpstream, TaggingUpstream, ask, backend, run


def chat(url: str, question: str, key: str = "sk-limits", **headers: str) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", timeout=30,
                         headers={"Authorization": f"Bearer {key}", **headers},
                         json={"model": "deepseek-chat", "messages": [{"role": "user", "content": question}]})


def error_of(resp: requests.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# -- in-flight ceiling ----------------------------------------------------------------------------


def test_in_flight_ceiling_sheds_with_503_and_retry_after_at_once(
        make_proxy: Any, tagging_upstream: tuple[TaggingUpstream, str]) -> None:
    fake, upstream_url = tagging_upstream
    fake.latency_s = 1.5
    url = make_proxy(backends=backend(upstream_url), server={"max_in_flight": 2},
                     cache={"semantic": False})
    results: list[int] = []
    slow = [threading.Thread(target=lambda i=i: results.append(chat(url, f"slow {i}").status_code))
            for i in range(2)]
    for thread in slow:
        thread.start()
    deadline = time.monotonic() + 10
    while requests.get(url + "/admin/debug/runtime", timeout=5).json()["in_flight"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    started = time.monotonic()
    shed = chat(url, "one too many")
    took = time.monotonic() - started
    assert shed.status_code == 503 and shed.headers["Retry-After"] == "1"
    assert error_of(shed)["type"] == "overloaded_error"
    assert took < 0.5, took
    # probes and metrics are not API calls: they still answer while the API sheds
    assert requests.get(url + "/healthz", timeout=5).status_code == 200
    assert requests.get(url + "/metrics", timeout=5).status_code == 200
    for thread in slow:
        thread.join(30)
    assert results == [200, 200]
    fake.latency_s = 0
    assert chat(url, "room again").status_code == 200
    assert requests.get(url + "/admin/debug/runtime", timeout=5).json()["in_flight"] == 0


# -- per-tenant rate limit ------------------------------------------------------------------------


def test_per_tenant_rate_limit_is_429_with_retry_after_and_per_tenant(make_proxy: Any) -> None:
    url = make_proxy(limits={"tenant_rate_per_s": 1.0, "tenant_burst": 3}, cache={"semantic": False})
    assert [chat(url, f"rate {i}", key="sk-rate-a").status_code for i in range(3)] == [200, 200, 200]
    limited = chat(url, "rate 3", key="sk-rate-a")
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    error = error_of(limited)
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited"
    # another key is another tenant with its own bucket; a spoofed tenant header changes nothing
    assert chat(url, "rate b", key="sk-rate-b").status_code == 200
    assert chat(url, "rate 4", key="sk-rate-a", **{"x-semcache-tenant": "b"}).status_code == 429
    # the passthrough route is an API route too; probes are not
    assert requests.get(url + "/v1/models", timeout=10,
                        headers={"Authorization": "Bearer sk-rate-a"}).status_code == 429
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    time.sleep(1.05)
    assert chat(url, "rate 5", key="sk-rate-a").status_code == 200


def test_rate_limited_request_is_refused_before_its_body_is_read(make_proxy: Any) -> None:
    import socket
    from urllib.parse import urlparse

    url = make_proxy(limits={"tenant_rate_per_s": 0.01, "tenant_burst": 1}, cache={"semantic": False})
    assert chat(url, "first", key="sk-body").status_code == 200
    where = urlparse(url)
    assert where.hostname is not None and where.port is not None
    started = time.monotonic()
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        # a body declared but never sent: only a refusal before reading can answer
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer sk-body\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 429"), reply[:200]
    assert b"Retry-After: 100" in reply
    assert time.monotonic() - started < 1.0


def test_keys_mode_rate_limit_counts_per_configured_tenant(make_proxy: Any) -> None:
    import hashlib

    keys = {"one": "pk-one-secret", "two": "pk-two-secret"}
    url = make_proxy(limits={"tenant_rate_per_s": 0.01, "tenant_burst": 2}, cache={"semantic": False},
                     tenancy={"mode": "keys", "keys": [
                         {"tenant": name, "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
                         for name, key in keys.items()]})
    assert [chat(url, f"k{i}", key=keys["one"]).status_code for i in range(3)] == [200, 200, 429]
    assert chat(url, "k", key=keys["two"]).status_code == 200
    assert chat(url, "k", key="pk-unknown").status_code == 401   # no bucket for strangers


# -- cache size ---------------------------------------------------------------------------------


def test_cache_keeps_at_most_max_entries(make_proxy: Any) -> None:
    url = make_proxy(cache={"max_entries": 5})
    questions = [f"What is the capital of country number {i}?" for i in range(20)]
    for question in questions:
        assert chat(url, question).status_code == 200
    deadline = time.monotonic() + 10
    while requests.get(url + "/metrics", timeout=5).text.count("semcache_cache_store_total{") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    stats = requests.get(url + "/admin/cache/stats", timeout=5).json()
    assert stats["max_entries"] == 5 and 1 <= stats["entries"] <= 5, stats
    # the oldest were evicted from the store and the index: no hit, exact or semantic
    assert chat(url, questions[0]).headers["x-semcache"] == "miss"
    assert chat(url, questions[-1]).headers["x-semcache"] == "exact"


# -- metric label sets --------------------------------------------------------------------------


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def junk(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "-_.:/") for _ in range(n))


async def label_storm(url: str, count: int, seed: int = 5) -> dict[int, int]:
    rng = random.Random(seed)
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(16)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        model = f"model-{junk(rng, rng.randint(1, 40))}"
        headers = {f"X-{junk(rng, 8)}": junk(rng, 10), "Cache-Control": rng.choice(
            ["no-store", "no-cache", junk(rng, 6), "no-store, " + junk(rng, 4)]),
            "x-semcache-threshold": rng.choice([junk(rng, 3), str(rng.random()), "nan", "-5"]),
            "Authorization": f"Bearer sk-{rng.getrandbits(40):x}", "User-Agent": junk(rng, 12),
            "OpenAI-Organization": junk(rng, 8)}
        kind = i % 10
        async with gate:
            if kind < 5:      # a valid request for a model nobody configured, never cached
                headers["Cache-Control"] = "no-store"
                body: dict[str, Any] = {"model": model,
                                        "messages": [{"role": "user", "content": junk(rng, 20)}]}
                if kind == 4:
                    body["stream"] = True
                answer = await ask(session, url, body, headers)
                status = answer.status
            elif kind < 8:    # invalid: a fast 400 that still carries the random model
                answer = await ask(session, url, {"model": model, "messages": junk(rng, 5),
                                                  junk(rng, 5): model}, headers)
                status = answer.status
            elif kind == 8:   # a random API path (pass-through to the backend)
                async with session.get(f"{url}/v1/{junk(rng, 12)}", headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            else:             # a random path outside the API
                async with session.request(rng.choice(["GET", "POST", "DELETE", "PATCH"]),
                                           f"{url}/{junk(rng, 12)}", headers=headers) as resp:
                    await resp.read()
                    status = resp.status
        statuses[status] = statuses.get(status, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))
    return statuses


def test_metric_series_stay_bounded_under_random_models_and_headers(
        make_proxy: Any, lenient_upstream: tuple[LenientUpstream, str]) -> None:
    url = make_proxy(backends=backend(lenient_upstream[1]))
    run(label_storm(url, 50, seed=1))   # every kind of request once, so their series exist
    before = series(requests.get(url + "/metrics", timeout=10).text)
    statuses = run(label_storm(url, 10_000), timeout=240)
    text = requests.get(url + "/metrics", timeout=10).text
    after = series(text)
    assert sum(statuses.values()) == 10_000
    assert not any(status >= 500 for status in statuses), statuses
    assert len(after - before) <= 50, sorted(after - before)[:60]
    assert "model-" not in text      # no client-chosen value became a label
    assert text.count("\n") < 5000, "the exposition itself stays small"


def test_metric_exposition_of_a_fresh_proxy_has_no_client_values(make_proxy: Any) -> None:
    url = make_proxy()
    resp = chat(url, "labels?", **{"X-Evil": 'a"b\\c', "User-Agent": "model-evil"})
    assert resp.status_code == 200
    text = requests.get(url + "/metrics", timeout=10).text
    assert "model-evil" not in text and "deepseek-chat" not in text
    orjson.dumps(text)  # plain text, nothing binary
