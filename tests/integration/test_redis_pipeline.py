"""The pipeline's lease hook, in process: two proxies on one Redis namespace (the session's real
redis-server). A replica that loses the lease waits for the other's answer and serves it, as JSON
or replayed as a stream (with usage when asked, ending with [DONE]); one backend call in all."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from tests.redis_server import RedisServer

ENV = {"SEMCACHE_TENANT_SECRET": "pipeline-test-secret"}


@pytest.fixture
def slow(upstream: tuple[FakeUpstream, str]) -> Iterator[FakeUpstream]:
    fake, _ = upstream
    saved = fake.latency_s
    fake.latency_s = 0.6
    yield fake
    fake.latency_s = saved


@pytest.fixture
def pair(make_proxy: Any, redis_url: str) -> tuple[str, str]:
    store = {"type": "redis", "url": redis_url, "namespace": f"pipe-{uuid.uuid4().hex[:8]}"}
    return make_proxy(ENV, store=store), make_proxy(ENV, store=store)


def _body(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "deepseek-chat", "messages": [{"role": "user", "content": question}], **extra}


async def test_the_lease_loser_replays_the_winners_answer_as_a_stream(pair: tuple[str, str],
                                                                       slow: FakeUpstream) -> None:
    a, b = pair
    question = f"Lease hook {uuid.uuid4().hex[:8]}"
    headers = {"Authorization": "Bearer sk-pipeline"}
    calls = slow.calls
    async with aiohttp.ClientSession(headers=headers) as session:
        async def first() -> dict[str, Any]:
            async with session.post(a + "/v1/chat/completions", json=_body(question)) as resp:
                assert resp.status == 200
                result: dict[str, Any] = await resp.json()
                return result

        leader = asyncio.create_task(first())
        await asyncio.sleep(0.2)  # A holds the lease and waits for the upstream
        streamed = _body(question, stream=True, stream_options={"include_usage": True})
        async with session.post(b + "/v1/chat/completions", json=streamed) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            raw = await resp.text()
        answer = await leader
    assert slow.calls == calls + 1
    events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == answer["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]
    assert chunks[0]["id"] != answer["id"]
    async with aiohttp.ClientSession() as session, session.get(b + "/metrics") as resp:
        assert 'semcache_coalesced_requests_total{kind="replica"} 1.0' in await resp.text()


async def test_without_contention_each_replica_calls_for_its_own_question(pair: tuple[str, str],
                                                                          slow: FakeUpstream) -> None:
    a, b = pair
    calls = slow.calls
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-pipeline"}) as session:
        async def ask(url: str, question: str) -> int:
            async with session.post(url + "/v1/chat/completions", json=_body(question)) as resp:
                return resp.status

        statuses = await asyncio.gather(ask(a, f"One {uuid.uuid4().hex}"), ask(b, f"Two {uuid.uuid4().hex}"))
    assert statuses == [200, 200] and slow.calls == calls + 2


async def test_a_no_cache_retry_succeeds_with_redis_gone(make_proxy: Any, tmp_path: Path) -> None:
    """The retry feedback deletes the entry that served the first try; with Redis gone by then
    that delete fails, and the retry must still be answered."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        url = make_proxy(ENV, cache={"threshold": 0.95},
                         store={"type": "redis", "url": server.url, "namespace": "retry"})
        headers = {"Authorization": "Bearer sk-retry"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async def ask(question: str, **extra: str) -> tuple[int, str]:
                async with session.post(url + "/v1/chat/completions", json=_body(question),
                                        headers=extra) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("x-semcache", "")

            assert await ask("What is the capital city of France?") == (200, "miss")
            for _ in range(50):  # stored after the answer went out
                if (await ask("Which city is the capital of France?"))[1] == "semantic":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("no semantic hit")
            server.kill()
            status, _ = await ask("Which city is the capital of France?", **{"Cache-Control": "no-cache"})
            assert status == 200
    finally:
        server.kill()
