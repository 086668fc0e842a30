"""Single-flight and semantic coalescing through the real proxy: concurrent misses for the same
answer cause one backend call, and every waiter still gets the whole answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from bench.fake_upstream import FakeUpstream


@pytest.fixture
def slow_upstream(upstream: tuple[FakeUpstream, str]) -> Iterator[FakeUpstream]:
    fake, _ = upstream
    saved = (fake.latency_s, fake.chunk_delay_s)
    fake.latency_s, fake.chunk_delay_s = 0.3, 0.02
    yield fake
    fake.latency_s, fake.chunk_delay_s = saved


def body(question: str, stream: bool) -> bytes:
    return orjson.dumps({"model": "deepseek-chat", "stream": stream,
                         "messages": [{"role": "user", "content": question}]})


async def ask(session: aiohttp.ClientSession, url: str, question: str, stream: bool) -> tuple[str, str]:
    async with session.post(url + "/v1/chat/completions", data=body(question, stream),
                            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()
        state = resp.headers["x-semcache"]
        if not stream:
            return (await resp.json())["choices"][0]["message"]["content"], state
        text = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                chunk = orjson.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    text.append(choice["delta"].get("content") or "")
        return "".join(text), state


async def test_200_identical_concurrent_requests_make_one_call(proxy: str,
                                                               slow_upstream: FakeUpstream) -> None:
    question = f"What is single flight? {uuid.uuid4().hex[:8]}"
    before = slow_upstream.calls
    connector = aiohttp.TCPConnector(limit=250)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(ask(session, proxy, question, stream=i % 2 == 0)
                                         for i in range(200)))
    assert slow_upstream.calls == before + 1
    texts = {text for text, _ in results}
    assert len(texts) == 1 and question in texts.pop()
    states = [state for _, state in results]
    # one leader; the others joined its call, or (arriving as it finished) read its stored answer
    assert states.count("miss") == 1
    assert set(states) <= {"miss", "coalesced", "exact"}, states


async def test_stream_followers_get_chunks_live(proxy: str, slow_upstream: FakeUpstream) -> None:
    slow_upstream.chunk_delay_s = 0.1
    question = f"Stream me slowly {uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session:
        leader = asyncio.create_task(ask(session, proxy, question, stream=True))
        await asyncio.sleep(0.5)  # the leader's stream is under way
        started = time.monotonic()
        async with session.post(proxy + "/v1/chat/completions", data=body(question, True),
                                headers={"Content-Type": "application/json"}) as resp:
            assert resp.headers["x-semcache"] == "coalesced"
            arrivals = []
            async for line in resp.content:
                if line.startswith(b"data: "):
                    arrivals.append(time.monotonic() - started)
        await leader
    # the follower saw the first event long before the stream ended
    assert arrivals[0] < arrivals[-1] / 3, arrivals


async def test_follower_leaving_does_not_disturb_others(proxy: str, slow_upstream: FakeUpstream) -> None:
    question = f"Who leaves first? {uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as session:
        stayer = asyncio.create_task(ask(session, proxy, question, stream=True))
        await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as other:
            leaver = asyncio.create_task(ask(other, proxy, question, stream=True))
            await asyncio.sleep(0.4)
            leaver.cancel()
        text, _ = await stayer
    assert question in text


async def test_backend_call_cancelled_when_every_waiter_leaves(proxy: str,
                                                               upstream: tuple[FakeUpstream, str]) -> None:
    fake, _ = upstream
    aborted = fake.aborted
    question = f"Never finish FAULT:stall {uuid.uuid4().hex[:8]}"
    for stream in (True, False):
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(ask(session, proxy, question, stream)) for _ in range(3)]
            await asyncio.sleep(0.5)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + 1.0
        while fake.aborted == aborted and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another thread
            await asyncio.sleep(0.02)
        assert fake.aborted == aborted + 1, f"stream={stream}: upstream call not cancelled within 1 s"
        aborted = fake.aborted


async def test_semantic_coalescing_shares_one_call(make_proxy: Any, slow_upstream: FakeUpstream) -> None:
    url = make_proxy(cache={"threshold": 0.9})
    tag = uuid.uuid4().hex[:6]
    before = slow_upstream.calls
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(ask(session, url, f"How do I reverse a list in Python? {tag}", False))
        await asyncio.sleep(0.15)
        second = await ask(session, url, f"How can I reverse a list in Python? {tag}", False)
        first_result = await first
    assert slow_upstream.calls == before + 1
    assert second[1] == "coalesced" and second[0] == first_result[0]
    metrics = await _metrics(url)
    assert 'semcache_coalesced_requests_total{kind="semantic"} 1.0' in metrics


async def test_no_coalescing_across_tenants(proxy: str, slow_upstream: FakeUpstream) -> None:
    question = f"Tenant scoped flight {uuid.uuid4().hex[:8]}"
    before = slow_upstream.calls

    async def as_tenant(key: str) -> tuple[str, str]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            return await ask(session, proxy, question, False)

    results = await asyncio.gather(as_tenant("sk-a"), as_tenant("sk-b"))
    assert slow_upstream.calls == before + 2
    assert [state for _, state in results] == ["miss", "miss"]


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        return await resp.text()
