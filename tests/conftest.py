"""Shared fixtures: a real proxy and a fake upstream served from a background event loop.

The servers run in their own thread so that the official openai SDK's *sync* client can be used
from a test without blocking the loop that serves it, exactly as an application would.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from bench.fake_upstream import FakeUpstream
from proxy.app import Overrides, Server, build_app
from proxy.config import BackendConfig, Config, EmbeddingConfig
from proxy.embedding import SentenceEmbedder
from tests.redis_server import RedisServer

os.environ.setdefault("OMP_NUM_THREADS", "1")
T = TypeVar("T")


class ServerLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="servers", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, shutdown_timeout=2, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.stop()


@pytest.fixture(scope="session")
def upstream(servers: ServerLoop) -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    runner, url = servers.run(serve(fake.app()))
    yield fake, url
    servers.run(runner.cleanup())


@pytest.fixture(scope="session")
def embedder(servers: ServerLoop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentenceEmbedder]:
    cache_dir = Path(os.environ.get("SEMCACHE_TEST_MODEL_CACHE", tmp_path_factory.mktemp("models")))
    model = SentenceEmbedder(EmbeddingConfig(cache_dir=str(cache_dir)))
    servers.run(model.start())
    yield model
    servers.run(model.close())


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port for the whole session (tests use their own
    namespaces); tests that kill or freeze Redis start their own."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


ProxyFactory = Callable[..., str]


@pytest.fixture
def make_proxy(servers: ServerLoop, upstream: tuple[FakeUpstream, str], embedder: SentenceEmbedder,
               tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start a proxy in front of the fake upstream; keyword arguments override config sections."""
    started: list[Server] = []

    def factory(environ: dict[str, str] | None = None, **sections: Any) -> str:
        _, upstream_url = upstream
        raw: dict[str, Any] = {
            "backends": [BackendConfig(name="fake", base_url=upstream_url, api_key_env=None).model_dump()],
            "store": {"data_dir": str(tmp_path / f"data{len(started)}")},
            # the product's own listening side (its HTTP parser errors are shaped there)
            "server": {"host": "127.0.0.1", "port": 0, "drain_timeout_s": 2},
        }
        for name, value in sections.items():
            raw[name] = {**raw.get(name, {}), **value} if isinstance(value, dict) else value
        config = Config.model_validate(raw)
        app = build_app(config, environ=environ or {}, overrides=Overrides(embedder=embedder))
        server = Server(app, config)
        url = servers.run(server.start())
        started.append(server)
        return url

    yield factory
    for server in started:
        servers.run(server.drain())


@pytest.fixture
def proxy(make_proxy: ProxyFactory) -> str:
    return make_proxy()
