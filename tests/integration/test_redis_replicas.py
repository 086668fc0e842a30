"""Two proxy processes (``python -m proxy serve``), one real redis-server (AOF on), one fake upstream:
what one replica caches the other serves, deletes and flushes reach both, concurrent identical
misses across replicas make one backend call (and a dead lease holder only delays the other),
nothing secret lands in Redis, and restarts (one proxy; Redis and every proxy) keep the cache.

Every test uses client keys of its own, hence tenants (cache scopes) of its own. Both replicas get
the same SEMCACHE_TENANT_SECRET, as replicas sharing a cache must.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import FakeUpstream
from proxy.embedding import SentenceEmbedder
from tests.redis_server import ProxyProcess, RedisServer, redis_proxy_config, start_all

MODEL = "deepseek-chat"
CAPITAL = "What is the capital city of France?"
CAPITAL_CLOSE = "Which city is the capital of France?"      # 0.972 to CAPITAL with MiniLM
SPIDER = "How many legs does a spider have?"
SPIDER_PARA = "How many legs do spiders have?"              # 0.967 to SPIDER
NAMESPACE = "replicas"
TENANT_SECRET = "test-tenant-secret-" + uuid.uuid4().hex
LEASE_TTL_S = 1.0


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), persistence=True).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def replicas(redis_aof: RedisServer, upstream: tuple[FakeUpstream, str], embedder: SentenceEmbedder,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyProcess, ProxyProcess]]:
    root = tmp_path_factory.mktemp("replicas")
    models_dir = os.environ.get("SEMCACHE_TEST_MODEL_CACHE") or embedder._config.cache_dir
    pair = tuple(
        ProxyProcess(name, root, redis_proxy_config(
            upstream_url=upstream[1], models_dir=str(models_dir), redis_url=redis_aof.url,
            namespace=NAMESPACE, data_dir=str(root / f"data-{name}"),
            store={"lease_ttl_s": LEASE_TTL_S}), env={"SEMCACHE_TENANT_SECRET": TENANT_SECRET})
        for name in ("a", "b"))
    a, b = pair
    start_all(a, b)
    yield a, b
    for proxy in pair:
        proxy.stop()


def new_key() -> str:
    return f"sk-{uuid.uuid4().hex[:16]}"


def ask(url: str, question: str, key: str, **extra: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", **extra.pop("headers", {})}
    resp = requests.post(url + "/v1/chat/completions", timeout=30, headers=headers,
                         json={"model": MODEL, "messages": [{"role": "user", "content": question}], **extra})
    assert resp.status_code == 200, resp.text[:300]
    return resp


def state(resp: requests.Response) -> str:
    return resp.headers.get("x-semcache", "")


def content(resp: requests.Response) -> str:
    return str(resp.json()["choices"][0]["message"]["content"])


def stores(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "semcache_cache_store_total" and sample.labels.get("outcome") == "stored")


def wait_stored(url: str, count: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while stores(url) < count:
        assert time.monotonic() < deadline, "the answer was not stored in time"
        time.sleep(0.01)


@pytest.fixture
def slow_upstream(upstream: tuple[FakeUpstream, str]) -> Iterator[FakeUpstream]:
    fake, _ = upstream
    saved = fake.latency_s
    fake.latency_s = 0.5
    yield fake
    fake.latency_s = saved


def test_cached_through_a_is_an_exact_and_semantic_hit_through_b_within_a_second(
        replicas: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, b = replicas
    key = new_key()
    before = stores(a.url)
    first = ask(a.url, CAPITAL, key)
    answered = time.monotonic()
    assert state(first) == "miss"
    wait_stored(a.url, before + 1)
    exact = ask(b.url, CAPITAL, key)
    semantic = ask(b.url, CAPITAL_CLOSE, key)
    elapsed = time.monotonic() - answered
    assert state(exact) == "exact" and content(exact) == content(first)
    assert state(semantic) == "semantic" and content(semantic) == content(first)
    assert elapsed < 1.0, f"B served the hits {elapsed:.2f} s after A answered"
    # and the other way round
    other = ask(b.url, SPIDER, key)
    assert state(other) == "miss"
    wait_stored(b.url, stores(b.url))
    deadline = time.monotonic() + 1.0
    while state(hit := ask(a.url, SPIDER_PARA, key)) != "semantic":
        assert time.monotonic() < deadline, state(hit)
        time.sleep(0.05)


def test_flush_through_a_is_seen_by_b(replicas: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, b = replicas
    key = new_key()
    before = stores(a.url)
    ask(a.url, SPIDER, key)
    wait_stored(a.url, before + 1)
    assert state(ask(b.url, SPIDER, key)) == "exact"
    flushed = requests.post(a.url + "/admin/cache/flush", timeout=30)
    assert flushed.status_code == 200 and flushed.json()["flushed"] >= 1
    assert requests.get(b.url + "/admin/cache/stats", timeout=10).json()["entries"] == 0
    # B serves nothing from before the flush, neither exactly nor by similarity
    assert state(ask(b.url, SPIDER_PARA, key)) == "miss"


def test_delete_through_a_is_seen_by_b(replicas: tuple[ProxyProcess, ProxyProcess]) -> None:
    """A no-cache retry right after a semantic hit deletes the entry that served it (the
    proxy's retry feedback): the delete goes through A, and B stops serving that entry."""
    a, b = replicas
    key = new_key()
    before = stores(a.url)
    ask(a.url, CAPITAL, key)
    wait_stored(a.url, before + 1)
    assert state(ask(b.url, CAPITAL_CLOSE, key, headers={"Cache-Control": "no-store"})) == "bypass"
    assert state(ask(a.url, CAPITAL_CLOSE, key)) == "semantic"
    retried = ask(a.url, CAPITAL_CLOSE, key, headers={"Cache-Control": "no-cache, no-store"})
    assert state(retried) == "bypass"
    assert state(ask(b.url, CAPITAL_CLOSE, key)) == "miss"


async def _ask_async(session: aiohttp.ClientSession, url: str, question: str, key: str,
                     stream: bool) -> tuple[int, str]:
    body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": question}]}
    async with session.post(url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        text = await resp.text()
        if not stream:
            return resp.status, str((await resp.json())["choices"][0]["message"]["content"])
        parts = []
        for line in text.splitlines():
            if line.startswith("data: {"):
                chunk = orjson.loads(line[6:])
                assert "error" not in chunk, chunk
                parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
        assert text.rstrip().endswith("data: [DONE]")
        return resp.status, "".join(parts)


async def test_concurrent_identical_misses_across_replicas_make_one_backend_call(
        replicas: tuple[ProxyProcess, ProxyProcess], slow_upstream: FakeUpstream) -> None:
    a, b = replicas
    key = new_key()
    question = f"Explain cross-replica single flight {uuid.uuid4().hex[:8]}"
    calls = slow_upstream.calls
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        results = await asyncio.gather(*(
            _ask_async(session, (a.url, b.url)[i % 2], question, key, stream=i % 3 == 0)
            for i in range(12)))
    assert slow_upstream.calls == calls + 1
    assert {status for status, _ in results} == {200}
    texts = {text for _, text in results}
    assert len(texts) == 1 and question in texts.pop()


async def test_a_dead_lease_holder_only_delays_the_other_replica(
        replicas: tuple[ProxyProcess, ProxyProcess], upstream: tuple[FakeUpstream, str],
        redis_aof: RedisServer) -> None:
    fake, _ = upstream
    a, b = replicas
    saved = fake.latency_s
    fake.latency_s = 2.5
    key = new_key()
    question = f"Who answers when the holder dies? {uuid.uuid4().hex[:8]}"
    calls = fake.calls
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            holder = asyncio.create_task(_ask_async(session, a.url, question, key, stream=False))
            with redis_aof.client() as client:
                deadline = time.monotonic() + 5
                # A holds the lease and its backend call is under way
                while not list(client.scan_iter(match=f"{NAMESPACE}:lease:*")) or fake.calls == calls:
                    assert time.monotonic() < deadline, "A never took the lease"
                    await asyncio.sleep(0.02)
            a.freeze()  # the holder stops renewing its lease, as if it had died
            try:
                started = time.monotonic()
                status, text = await _ask_async(session, b.url, question, key, stream=True)
                waited = time.monotonic() - started
            finally:
                a.thaw()
            assert status == 200 and question in text
            # B waited for the lease to run out, then asked the backend itself
            assert LEASE_TTL_S * 0.5 < waited < LEASE_TTL_S + fake.latency_s + 2.0, waited
            assert fake.calls == calls + 2
            status, text = await holder
            assert status == 200 and question in text
    finally:
        fake.latency_s = saved


def test_nothing_secret_in_redis_and_every_key_namespaced(replicas: tuple[ProxyProcess, ProxyProcess],
                                                          redis_aof: RedisServer) -> None:
    a, b = replicas
    key = new_key()
    before = stores(a.url)
    ask(a.url, "Is my key stored anywhere?", key)
    ask(b.url, "Is my key stored anywhere else?", key, stream=False)
    wait_stored(a.url, before + 1)
    dump = redis_aof.dump()
    assert dump
    secrets = [key.encode(), key[3:].encode(), TENANT_SECRET.encode(), b"Bearer"]
    for name, value in dump:
        assert name.startswith(NAMESPACE.encode() + b":"), name
        for secret in secrets:
            assert secret not in name and secret not in value, (name, secret)


def test_a_proxy_restarted_alone_rebuilds_its_index_from_redis(
        replicas: tuple[ProxyProcess, ProxyProcess]) -> None:
    a, b = replicas
    key = new_key()
    before = stores(a.url)
    ask(a.url, SPIDER, key)
    wait_stored(a.url, before + 1)
    b.stop()
    b.start()
    log = b.log_text()
    assert "index rebuilt from the shared store" in log, log[-2000:]
    hit = ask(b.url, SPIDER_PARA, key)
    assert state(hit) == "semantic" and SPIDER in content(hit)


def test_a_full_restart_of_redis_and_the_proxies_keeps_the_cache(
        replicas: tuple[ProxyProcess, ProxyProcess], redis_aof: RedisServer, tmp_path: Path) -> None:
    a, b = replicas
    key = new_key()
    before = stores(a.url)
    first = ask(a.url, CAPITAL, key)
    wait_stored(a.url, before + 1)
    a.stop()
    b.stop()
    redis_aof.restart()
    start_all(a, b)
    exact = ask(b.url, CAPITAL, key)
    assert state(exact) == "exact" and content(exact) == content(first)
    semantic = ask(a.url, CAPITAL_CLOSE, key)
    assert state(semantic) == "semantic" and content(semantic) == content(first)
