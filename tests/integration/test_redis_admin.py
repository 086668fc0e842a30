"""The admin cache routes with the shared store gone: a killed redis-server makes
/admin/cache/stats and /admin/cache/flush answer 503 in OpenAI's error shape with Retry-After
(store.breaker_open_s), and 200 again once Redis is back, without a restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests

from tests.redis_server import RedisServer

ENV = {"SEMCACHE_TENANT_SECRET": "admin-test-secret"}


def _assert_unavailable(resp: requests.Response) -> None:
    assert resp.status_code == 503, resp.text[:300]
    assert resp.headers["Retry-After"] == "3"
    error = resp.json()["error"]
    assert error["type"] == "overloaded_error" and error["code"] == "cache_unavailable"
    assert set(error) == {"message", "type", "param", "code"}
    assert "127.0.0.1" not in error["message"]  # nothing about where Redis lives


def test_admin_cache_routes_answer_503_while_redis_is_down(make_proxy: Any, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        proxy = make_proxy(ENV, store={"type": "redis", "url": server.url, "namespace": "admin",
                                       "breaker_open_s": 3.0})
        assert requests.get(proxy + "/admin/cache/stats", timeout=30).status_code == 200
        server.kill()
        for _ in range(2):  # the first meets the dead Redis, the second the open breaker
            _assert_unavailable(requests.get(proxy + "/admin/cache/stats", timeout=30))
            _assert_unavailable(requests.post(proxy + "/admin/cache/flush", timeout=30))
        server.start()  # the same port
        deadline = time.monotonic() + 15
        while (resp := requests.get(proxy + "/admin/cache/stats", timeout=30)).status_code != 200:
            assert resp.status_code == 503 and time.monotonic() < deadline
            time.sleep(0.2)
        assert resp.json()["entries"] == 0
        flushed = requests.post(proxy + "/admin/cache/flush", timeout=30)
        assert flushed.status_code == 200 and flushed.json() == {"flushed": 0}
    finally:
        server.kill()
