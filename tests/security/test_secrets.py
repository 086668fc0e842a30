"""Invariant 4: secrets appear only in the outbound Authorization header.

Two real ``python -m proxy serve`` processes at log level DEBUG (one with the in-process store and
its snapshot, one with Redis) get canaries: an upstream key through ``api_key_env``, an admin token
through ``admin_token_env``, a metrics token through ``metrics_token_env`` and a client key sent in
pass-through mode. After a scripted run with hits, misses, streams, upstream errors, broken
streams, bad input, admin and scrape calls, requests aiohttp's parser refuses (quoting the client
key in its error) and a SIGTERM, the
canaries are searched for in the logs, /metrics, every response (headers and bodies), every file
under the data dir (snapshot, tenant.key) and every key and value in Redis. Positive control: the
fake upstream did receive both keys.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.fake_upstream import FakeUpstream
from proxy.config import ConfigError, parse_config
from proxy.embedding import SentenceEmbedder
from tests.redis_server import ProxyProcess, RedisServer
from tests.security.test_hostile_input import raw_http

UPSTREAM_CANARY = "sk-upstream-canary-" + uuid.uuid4().hex
CLIENT_CANARY = "sk-client-canary-" + uuid.uuid4().hex
ADMIN_CANARY = "admin-canary-" + uuid.uuid4().hex
METRICS_CANARY = "metrics-canary-" + uuid.uuid4().hex
CANARIES = (UPSTREAM_CANARY, CLIENT_CANARY, ADMIN_CANARY, METRICS_CANARY)

#: requests aiohttp's own parser refuses, each carrying the client's key in the bytes it quotes
#: in its error (an oversized Authorization, a request line, a header with a bad name)
MALFORMED = [
    b"GET /v1/models HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer " + CLIENT_CANARY.encode()
    + b"x" * 9000 + b"\r\n\r\n",
    b"GET /v1/models?k=" + CLIENT_CANARY.encode() + b" HTTP/1.1 extra\r\nHost: p\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: p\r\nBad Authorization: Bearer " + CLIENT_CANARY.encode()
    + b"\r\n\r\n",
]


def config(upstream_url: str, models_dir: str, data_dir: Path, store: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "log_level": "DEBUG", "admin_token_env": "CANARY_ADMIN_TOKEN",
                   "metrics_token_env": "CANARY_METRICS_TOKEN", "drain_timeout_s": 5,
                   "max_body_bytes": 65536},
        "backends": [
            # model "keyed-*": the proxy's own upstream key; anything else: the client's key
            {"name": "keyed", "base_url": upstream_url, "api_key_env": "CANARY_UPSTREAM_KEY",
             "models": ["keyed-*"], "retries": 0},
            {"name": "pass", "base_url": upstream_url, "api_key_env": None, "retries": 0},
        ],
        "embedding": {"cache_dir": models_dir},
        "store": {"data_dir": str(data_dir), "snapshot_interval_s": 0.5, **store},
        "routing": {"health_interval_s": 0.5},
    }


def script(url: str) -> list[requests.Response]:
    """Hits, misses, streams, errors and admin calls; every response is kept."""
    out: list[requests.Response] = []
    client = {"Authorization": f"Bearer {CLIENT_CANARY}"}

    def chat(content: str, model: str = "deepseek-chat", **extra: Any) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
        out.append(requests.post(url + "/v1/chat/completions", json=body, headers=client, timeout=30))

    for model in ("deepseek-chat", "keyed-chat"):
        chat("Where do secrets go?", model)                       # miss
        chat("Where do secrets go?", model)                       # exact hit
        chat("Where do the secrets go?", model)                   # semantic or miss
        chat("Stream me the secret path.", model, stream=True)    # streamed miss
        chat("Stream me the secret path.", model, stream=True)    # streamed hit
        for fault in ("500", "401", "429", "garbage"):
            chat(f"FAULT:{fault} please", model)
        for fault in ("break", "error_event", "nodone"):
            chat(f"FAULT:{fault} please", model, stream=True)
        chat("x", model, temperature="hot")                       # 400
    out.append(requests.post(url + "/v1/completions", json={"model": "keyed-x", "prompt": "p"},
                             headers=client, timeout=30))
    out.append(requests.post(url + "/v1/chat/completions", data=b"{nope", headers=client, timeout=30))
    out.append(requests.post(url + "/v1/chat/completions", data=b"x" * 70_000, headers=client, timeout=30))
    out.append(requests.get(url + "/v1/models", headers=client, timeout=30))
    out.append(requests.get(url + "/v1/nothing-here", headers=client, timeout=30))
    out.append(requests.get(url + "/nowhere", headers=client, timeout=30))
    out.append(requests.get(url + "/admin/cache/stats", headers=client, timeout=30))     # 401
    admin = {"Authorization": f"Bearer {ADMIN_CANARY}"}
    out.append(requests.get(url + "/admin/cache/stats", headers=admin, timeout=30))
    out.append(requests.get(url + "/readyz", timeout=30))
    out.append(requests.get(url + "/openapi.json", timeout=30))
    scraper = {"Authorization": f"Bearer {METRICS_CANARY}"}
    for path in ("/", "/metrics"):
        out.append(requests.get(url + path, timeout=30))                                # 401
        out.append(requests.get(url + path, headers=client, timeout=30))                # 401
        out.append(requests.get(url + path, headers=scraper, timeout=30))
    return out


def malformed(url: str) -> list[bytes]:
    """aiohttp's plain-text 400s: they quote the offending bytes back to the sender (the same
    connection, nobody else), so they are checked for status only; the log must not quote them."""
    replies = [raw_http(url, data) for data in MALFORMED]
    assert all(reply.startswith(b"HTTP/1.0 400 ") for reply in replies), [r[:80] for r in replies]
    return replies


def response_text(resp: requests.Response) -> str:
    return f"{resp.status_code} {sorted(resp.headers.items())!r} {resp.content!r}"


def files_under(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.fixture
def models_dir(embedder: SentenceEmbedder) -> str:
    return os.environ.get("SEMCACHE_TEST_MODEL_CACHE") or str(embedder._config.cache_dir)


def test_canaries_never_leave_the_authorization_header(
        upstream: tuple[FakeUpstream, str], models_dir: str, tmp_path: Path) -> None:
    fake, upstream_url = upstream
    redis = RedisServer(tmp_path / "redis").start()
    env = {"CANARY_UPSTREAM_KEY": UPSTREAM_CANARY, "CANARY_ADMIN_TOKEN": ADMIN_CANARY,
           "CANARY_METRICS_TOKEN": METRICS_CANARY}
    memory = ProxyProcess("memory", tmp_path / "memory", config(
        upstream_url, models_dir, tmp_path / "memory" / "data", {}), env=env)
    shared = ProxyProcess("redis", tmp_path / "redis-proxy", config(
        upstream_url, models_dir, tmp_path / "redis-proxy" / "data",
        {"type": "redis", "redis_url": redis.url, "namespace": "secrets"}), env=env)
    try:
        memory.launch()
        shared.launch()
        memory.wait_ready()
        shared.wait_ready()
        seen_before = len(fake.auth_seen)
        responses = script(memory.url) + script(shared.url)
        for proc in (memory, shared):
            malformed(proc.url)
        metrics = [requests.get(p.url + "/metrics", timeout=10,
                                headers={"Authorization": f"Bearer {METRICS_CANARY}"}).text
                   for p in (memory, shared)]
        assert all("semcache_requests_total" in text for text in metrics)
        memory.stop()
        shared.stop()
        assert memory.proc is not None and memory.proc.returncode == 0, memory.log_tail()
        assert shared.proc is not None and shared.proc.returncode == 0, shared.log_tail()
        dump = redis.dump()
    finally:
        memory.stop()
        shared.stop()
        redis.kill()

    # positive controls: the run did what it should, and the keys did reach the upstream
    statuses = {resp.status_code for resp in responses}
    assert {200, 400, 401, 404, 413, 429, 500}.issubset(statuses), statuses
    sent = fake.auth_seen[seen_before:]
    assert f"Bearer {UPSTREAM_CANARY}" in sent and f"Bearer {CLIENT_CANARY}" in sent
    logs = memory.log_text() + shared.log_text()
    assert " DEBUG " in logs and "backend keyed (openai) at http://127.0.0.1:" in logs
    # the parser's refusals are logged, once each, as one line without the bytes they carried
    assert logs.count("refused a malformed HTTP request from 127.0.0.1") == 2 * len(MALFORMED), logs[-3000:]
    assert "Error handling request" not in logs and "Traceback" not in logs
    data_files = files_under(tmp_path / "memory" / "data") | files_under(tmp_path / "redis-proxy" / "data")
    assert any(path.name == "cache.snapshot" for path in data_files), list(data_files)
    assert any(path.name == "tenant.key" for path in data_files)
    assert dump, "nothing was written to Redis"

    for canary in CANARIES:
        assert canary not in logs, f"{canary[:20]} in the logs"
        for text in metrics:
            assert canary not in text
        for resp in responses:
            assert canary not in response_text(resp), resp.url
        for path, content in data_files.items():
            assert canary.encode() not in content, path
        for key, value in dump:
            assert canary.encode() not in key and canary.encode() not in value, key


def test_credentials_in_a_backend_url_are_refused_without_echoing_them() -> None:
    for url in ("http://user:hunter2-secret@127.0.0.1:9", "https://hunter2-secret@api.example.com"):
        with pytest.raises(ConfigError) as refused:
            parse_config(f"backends: [{{name: b, base_url: '{url}'}}]")
        assert "hunter2-secret" not in str(refused.value)
        assert "credentials" in str(refused.value)


@pytest.mark.parametrize("url", ["ftp://h", "http://", "http://h:notaport", "http://h:70000",
                                 "http://h/v1?key=1", "http://h/#x", "file:///etc/passwd"])
def test_other_bad_backend_urls_are_refused_at_start_up(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(f"backends: [{{name: b, base_url: '{url}'}}]")


def test_a_refused_serve_exits_2_and_prints_no_secret(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text("backends: [{name: b, base_url: 'http://u:hunter2-secret@127.0.0.1:9'}]\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 2, done.stderr
    assert "hunter2-secret" not in done.stdout + done.stderr
    assert "credentials" in done.stderr
