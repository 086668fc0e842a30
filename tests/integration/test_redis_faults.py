"""Redis faults are misses: a proxy process on a real redis-server under a steady load while Redis is
killed (SIGKILL), frozen (SIGSTOP/SIGCONT), slow (DEBUG SLEEP), flushed, or down when the proxy
starts. Every client request must succeed; the cache must work again once Redis is back, without
a restart. The added p99 during each fault is printed (``-s``) and, when SEMCACHE_FAULT_REPORT
names a file, appended to it as JSON lines (docs/scaling.md quotes a run).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis

from bench.fake_upstream import FakeUpstream
from proxy.embedding import SentenceEmbedder
from tests.redis_server import ProxyProcess, RedisServer, redis_proxy_config

MODEL = "deepseek-chat"
WORKERS = 4
BREAKER_OPEN_S = 1.0


@dataclass
class Sample:
    started: float     # seconds since the load began
    seconds: float
    status: int | str
    result: str


@dataclass
class Lab:
    redis: RedisServer
    proxy: ProxyProcess
    tenant: str = field(default_factory=lambda: f"sk-{uuid.uuid4().hex[:12]}")
    baseline_p99: float | None = None


@pytest.fixture(scope="module")
def lab(upstream: tuple[FakeUpstream, str], embedder: SentenceEmbedder,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("redis-faults")
    server = RedisServer(root / "redis").start()
    models_dir = os.environ.get("SEMCACHE_TEST_MODEL_CACHE") or embedder._config.cache_dir
    proxy = ProxyProcess("p", root, redis_proxy_config(
        upstream_url=upstream[1], models_dir=str(models_dir), redis_url=server.url, namespace="faults",
        data_dir=str(root / "data"), store={"breaker_open_s": BREAKER_OPEN_S}))
    proxy.config["server"]["log_level"] = "WARNING"
    proxy.start()
    yield Lab(server, proxy)
    proxy.stop()
    server.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _one(session: aiohttp.ClientSession, url: str, key: str, question: str) -> tuple[int, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}]}
    async with session.post(url + "/v1/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {key}"}) as resp:
        payload = await resp.json()
        if resp.status == 200:
            assert "choices" in payload, payload
        return resp.status, resp.headers.get("x-semcache", "")


Action = Callable[[], Any]


async def drive(lab: Lab, seconds: float, actions: list[tuple[float, Action]] | None = None) -> list[Sample]:
    """Bounded load: WORKERS clients, each alternating a repeated question (a hit while Redis is
    well) and a new one (a miss), for ``seconds``; ``actions`` run at their offsets meanwhile."""
    samples: list[Sample] = []
    began = time.monotonic()
    hot = [f"Hot question number {i} about caching" for i in range(5)]

    async def worker(n: int, session: aiohttp.ClientSession) -> None:
        i = 0
        while time.monotonic() - began < seconds:
            i += 1
            question = hot[(n + i) % len(hot)] if i % 2 else f"Fresh question {uuid.uuid4().hex}"
            started = time.monotonic()
            try:
                status, result = await _one(session, lab.proxy.url, lab.tenant, question)
            except (aiohttp.ClientError, TimeoutError, AssertionError) as exc:
                status, result = type(exc).__name__, "failed"
            samples.append(Sample(started - began, time.monotonic() - started, status, result))

    async def scheduler() -> None:
        for at, action in sorted(actions or [], key=lambda pair: pair[0]):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - began)))
            await asyncio.to_thread(action)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(scheduler(), *(worker(n, session) for n in range(WORKERS)))
    return samples


def report(lab: Lab, fault: str, samples: list[Sample], window: tuple[float, float]) -> dict[str, Any]:
    failed = [s for s in samples if s.status != 200]
    during = [s.seconds for s in samples if window[0] <= s.started <= window[1]]
    outside = [s.seconds for s in samples if not window[0] - 0.2 <= s.started <= window[1] + 0.5]
    baseline = lab.baseline_p99 if lab.baseline_p99 is not None else percentile(outside, 0.99)
    figures = {
        "fault": fault, "requests": len(samples), "failed": len(failed),
        "requests_during_fault": len(during),
        "p50_ms_during": round(percentile(during, 0.5) * 1000, 1),
        "p99_ms_during": round(percentile(during, 0.99) * 1000, 1),
        "max_ms_during": round(max(during, default=0.0) * 1000, 1),
        "p99_ms_baseline": round(baseline * 1000, 1),
        "added_p99_ms": round((percentile(during, 0.99) - baseline) * 1000, 1),
        "results_during": {r: sum(1 for s in samples if window[0] <= s.started <= window[1] and s.result == r)
                           for r in {s.result for s in samples}},
    }
    print(f"\nREDIS-FAULT {json.dumps(figures)}")
    path = os.environ.get("SEMCACHE_FAULT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(figures) + "\n")
    assert not failed, failed[:5]
    return figures


async def recovered(lab: Lab, within: float = 10.0) -> float:
    """Seconds until a new question asked twice is an exact hit the second time."""
    began = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while True:
            question = f"Are we back? {uuid.uuid4().hex}"
            status, _ = await _one(session, lab.proxy.url, lab.tenant, question)
            assert status == 200
            await asyncio.sleep(0.2)  # the answer is stored after it is sent
            status, result = await _one(session, lab.proxy.url, lab.tenant, question)
            assert status == 200
            if result == "exact":
                return time.monotonic() - began
            assert time.monotonic() - began < within, "the cache did not come back"
            await asyncio.sleep(0.2)


def _readyz(lab: Lab) -> dict[str, Any]:
    with urllib.request.urlopen(lab.proxy.url + "/readyz", timeout=5) as resp:
        assert resp.status == 200
        result: dict[str, Any] = json.loads(resp.read())
        return result


async def test_baseline(lab: Lab) -> None:
    await drive(lab, 1.0)  # warm: the hot questions are cached
    samples = await drive(lab, 3.0)
    assert all(s.status == 200 for s in samples)
    lab.baseline_p99 = percentile([s.seconds for s in samples], 0.99)
    hits = sum(1 for s in samples if s.result == "exact")
    assert hits >= len(samples) // 3, "the hot questions should be exact hits"
    print(f"\nREDIS-FAULT baseline p50 {percentile([s.seconds for s in samples], 0.5) * 1000:.1f} ms "
          f"p99 {lab.baseline_p99 * 1000:.1f} ms over {len(samples)} requests")


async def test_redis_killed_mid_load(lab: Lab) -> None:
    samples = await drive(lab, 5.0, [(1.0, lab.redis.kill), (3.0, lab.redis.start)])
    report(lab, "kill", samples, (1.0, 3.0))
    assert await recovered(lab) < BREAKER_OPEN_S + 5


async def test_redis_frozen_mid_load(lab: Lab) -> None:
    samples = await drive(lab, 5.0, [(1.0, lab.redis.freeze), (3.0, lab.redis.thaw)])
    report(lab, "freeze", samples, (1.0, 3.0))
    assert await recovered(lab) < BREAKER_OPEN_S + 5


async def test_readiness_comes_back_after_an_outage_that_keeps_the_feed(lab: Lab) -> None:
    # frozen past the follower's time budget (background_timeout_s, 5 s): its read fails, but
    # the stream keeps its place, so it resumes without a rebuild; readiness must say so
    await asyncio.to_thread(lab.redis.freeze)
    try:
        deadline = time.monotonic() + 20
        while "unavailable" not in (await asyncio.to_thread(_readyz, lab)).get("cache.index", ""):
            assert time.monotonic() < deadline, "the follower never noticed the frozen Redis"
            await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(lab.redis.thaw)
    deadline = time.monotonic() + 30
    while (ready := await asyncio.to_thread(_readyz, lab)).get("cache.index") != "following":
        assert time.monotonic() < deadline, ready
        await asyncio.sleep(0.5)


def _slow(server: RedisServer, seconds: float) -> Action:
    def run() -> None:
        client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            client.execute_command("DEBUG", "SLEEP", "0.2")  # Redis answers nobody for 200 ms
            time.sleep(0.05)
        client.close()

    def start() -> None:
        threading.Thread(target=run, daemon=True).start()

    return start


async def test_redis_slow_mid_load(lab: Lab) -> None:
    samples = await drive(lab, 5.0, [(1.0, _slow(lab.redis, 2.0))])
    report(lab, "slow", samples, (1.0, 3.0))
    assert await recovered(lab) < BREAKER_OPEN_S + 5


async def test_redis_flushed_mid_load(lab: Lab) -> None:
    samples = await drive(lab, 4.0, [(1.0, lab.redis.flushall), (2.0, lab.redis.flushall)])
    report(lab, "flush", samples, (1.0, 2.5))
    assert await recovered(lab) < 5


async def test_proxy_started_with_redis_down(lab: Lab) -> None:
    lab.proxy.stop()
    lab.redis.kill()
    started = time.monotonic()
    lab.proxy.start()
    print(f"\nREDIS-FAULT proxy ready in {time.monotonic() - started:.1f} s with redis down")
    ready = await asyncio.to_thread(_readyz, lab)
    assert ready["status"] == "ready"
    assert "unavailable" in ready.get("cache.index", ""), ready
    samples = await drive(lab, 4.0, [(2.0, lab.redis.start)])
    report(lab, "down_at_start", samples, (0.0, 2.0))
    assert await recovered(lab) < BREAKER_OPEN_S + 5
    ready = await asyncio.to_thread(_readyz, lab)
    assert ready.get("cache.index") == "following" and ready.get("cache.redis") == "closed", ready

