"""Fixtures for the security tests: a fake upstream of their own that tags every answer with
the tenant that asked, and an asyncio HTTP client that reads answers the way a client would."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bench.fake_upstream import FakeUpstream
from tests.conftest import ServerLoop, serve

_TAG: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="?")


@dataclass
class TaggingUpstream(FakeUpstream):
    """The fake upstream, but every answer starts with ``[<User-Agent>]``: clients send their
    true tenant name as User-Agent (forwarded upstream, never part of a cache scope), so an
    answer delivered to the wrong tenant carries the other tenant's tag. ``seen`` records
    (tag, last user text, Authorization) for every call."""

    seen: list[tuple[str, str, str | None]] = field(default_factory=list)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        _TAG.set(request.headers.get("User-Agent", "?"))
        return await super().chat(request)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        _TAG.set(request.headers.get("User-Agent", "?"))
        return await super().completions(request)

    def _answer(self, prompt: str) -> str:
        return f"[{_TAG.get()}] " + super()._answer(prompt)

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], str | None]:
        body, fault = await super()._begin(request)
        messages = body.get("messages") or [{}]
        last = messages[-1].get("content") if isinstance(messages[-1], dict) else None
        text = last if isinstance(last, str) else str(body.get("prompt"))
        self.seen.append((_TAG.get(), text, request.headers.get("Authorization")))
        return body, fault


class LenientUpstream(FakeUpstream):
    """The fake upstream reading bodies as the proxy does (orjson): the stock one re-encodes the
    body with orjson after parsing it with json, and answers 500 for integers past 64 bits that
    the proxy, like orjson, reads as floats. A fuzzer must not blame the proxy for that."""

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], str | None]:
        body = orjson.loads(await request.read())
        self.calls += 1
        return body, None


@pytest.fixture
def lenient_upstream(servers: ServerLoop) -> Iterator[tuple[LenientUpstream, str]]:
    fake = LenientUpstream(keep_requests=False)
    runner, url = servers.run(serve(fake.app()))
    yield fake, url
    servers.run(runner.cleanup())


@pytest.fixture
def tagging_upstream(servers: ServerLoop) -> Iterator[tuple[TaggingUpstream, str]]:
    """A fresh tagging upstream for one test (its counters are the test's own)."""
    fake = TaggingUpstream()
    runner, url = servers.run(serve(fake.app()))
    yield fake, url
    servers.run(runner.cleanup())


def backend(url: str, **extra: Any) -> list[dict[str, Any]]:
    """make_proxy's ``backends`` section for one upstream."""
    return [{"name": "fake", "base_url": url, "api_key_env": None, **extra}]


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    content: str | None = None     # the answer's text (JSON or the joined stream deltas)
    done: bool = False             # a stream ended with [DONE] and no error event

    @property
    def state(self) -> str:
        return self.headers.get("x-semcache", "")


def parse(status: int, headers: dict[str, str], body: bytes, stream: bool) -> Answer:
    answer = Answer(status, headers, body)
    if status != 200:
        return answer
    if not stream:
        data = orjson.loads(body)
        choice = data["choices"][0]
        answer.content = choice["message"]["content"] if "message" in choice else choice["text"]
        return answer
    parts: list[str] = []
    error = False
    for line in body.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            answer.done = not error
            break
        chunk = orjson.loads(payload)
        if "error" in chunk:
            error = True
            continue
        for choice in chunk.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            parts.append(piece or "")
    answer.content = "".join(parts)
    return answer


async def ask(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
              headers: dict[str, str] | None = None, path: str = "/v1/chat/completions") -> Answer:
    async with session.post(url + path, data=orjson.dumps(body),
                            headers={"Content-Type": "application/json", **(headers or {})}) as resp:
        raw = await resp.read()
        return parse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, raw,
                     bool(body.get("stream")))


def run(coro: Any, timeout: float = 300) -> Any:
    """Drive a client coroutine from a sync test (the servers run on their own loop)."""
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro
    return asyncio.run(bounded())
