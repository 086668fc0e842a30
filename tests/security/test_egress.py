"""Invariant 9: the proxy connects only to its configured backends, and only to their API paths.

Redirects from a backend are never followed (a 3xx goes back to the client as it came, and is
not cached), a client cannot steer the pass-through route out of /v1/ with dot segments, and an
absolute-form request target or a Host header naming another server changes nothing. Backend
URLs are validated at start-up: tests/security/test_secrets.py (credentials are refused and never
echoed; other malformed URLs are refused).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pytest
import requests
from aiohttp import web

from tests.conftest import ServerLoop, serve
from tests.security.conftest import backend


@dataclass
class Recorder:
    """Answers anything; remembers method and raw path of every request it got."""

    hits: list[tuple[str, str]] = field(default_factory=list)
    redirect_to: str | None = None     # answer 307/302/301 to this base URL instead
    cookies: list[str | None] = field(default_factory=list)   # the Cookie header of each request
    set_cookie: str | None = None      # send this Set-Cookie with every answer

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.hits.append((request.method, request.raw_path))
        self.cookies.append(request.headers.get("Cookie"))
        if self.redirect_to is not None:
            status = 307 if request.method == "POST" else 302
            return web.json_response({"redirected": True}, status=status,
                                     headers={"Location": self.redirect_to + request.raw_path})
        headers = {"Set-Cookie": self.set_cookie} if self.set_cookie else None
        return web.json_response({"object": "list", "data": [], "path": request.raw_path},
                                 headers=headers)


@pytest.fixture
def recorders(servers: ServerLoop) -> Iterator[tuple[Recorder, str, Recorder, str]]:
    """(redirecting upstream, its URL, the redirect target, its URL)."""
    target = Recorder()
    target_runner, target_url = servers.run(serve(target.app()))
    redirecting = Recorder(redirect_to=target_url)
    runner, url = servers.run(serve(redirecting.app()))
    yield redirecting, url, target, target_url
    servers.run(runner.cleanup())
    servers.run(target_runner.cleanup())


def test_redirects_from_the_backend_are_not_followed(make_proxy: Any,
                                                     recorders: tuple[Recorder, str, Recorder, str]) -> None:
    redirecting, upstream_url, target, _ = recorders
    url = make_proxy(backends=backend(upstream_url, retries=0, health_path="/health"),
                     routing={"health_interval_s": 0.1})
    chat: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "where do redirects go?"}]}
    replies = [
        requests.post(url + "/v1/chat/completions", json=chat, timeout=10),
        requests.post(url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=10),
        requests.post(url + "/v1/completions", json={"model": "m", "prompt": "redirect?"}, timeout=10),
        requests.get(url + "/v1/models", timeout=10, allow_redirects=False),
        requests.post(url + "/v1/chat/completions", json=chat, timeout=10),   # asked again
    ]
    for resp in replies:
        # the backend's 3xx is passed on as it came (no Location: the client is not sent
        # elsewhere either), or refused; never an answer from the redirect target
        assert resp.status_code in (302, 307, 502), (resp.status_code, resp.text[:200])
        assert "location" not in {k.lower() for k in resp.headers}
        assert "redirected" in resp.text or "error" in resp.text
    assert target.hits == [], target.hits
    # the repeat reached the backend again: a redirect is never cached
    assert redirecting.hits.count(("POST", "/v1/chat/completions")) == 3
    assert any(path == "/health" for _, path in redirecting.hits)   # probes ran, unfollowed too


@pytest.fixture
def recorder(servers: ServerLoop) -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()
    runner, url = servers.run(serve(rec.app()))
    yield rec, url
    servers.run(runner.cleanup())


def test_cookies_a_backend_sets_are_never_sent_back(make_proxy: Any,
                                                    recorder: tuple[Recorder, str]) -> None:
    """The proxy's upstream session keeps no cookie jar: a cookie the backend set while
    answering one client (a session, a load balancer's affinity) would otherwise ride along
    on every later call, whoever makes it. By host name, since aiohttp's jar ignores cookies
    from IP addresses."""
    rec, upstream_url = recorder
    rec.set_cookie = "session=given-to-alice; Path=/"
    url = make_proxy(backends=backend(upstream_url.replace("127.0.0.1", "localhost"),
                                      health_path="off"))
    for key in ("sk-alice", "sk-bob"):
        resp = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                            timeout=10)
        assert resp.status_code == 200, resp.text[:200]
        assert "set-cookie" not in {k.lower() for k in resp.headers}
        chat = {"model": "m", "messages": [{"role": "user", "content": f"hello from {key}"}]}
        resp = requests.post(url + "/v1/chat/completions", json=chat, timeout=10,
                             headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text[:200]
    assert len(rec.cookies) == 4 and rec.cookies == [None] * 4, rec.cookies


def raw_request(url: str, target: bytes, extra: bytes = b"") -> bytes:
    where = urlparse(url)
    assert where.hostname is not None and where.port is not None
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\n" + extra
                     + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


TRAVERSALS = [b"/v1/../health", b"/v1/%2e%2e/health", b"/v1/%2E%2E/admin", b"/v1/..%2fadmin",
              b"/v1/a/../../metrics", b"/v1/.%2e/x", b"/v1/./models/../../slots", b"/v1/x%3Fy=1",
              b"/v1/x%23frag", b"/v1/..\\admin"]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_passthrough_cannot_leave_v1(make_proxy: Any, recorder: tuple[Recorder, str], target: bytes) -> None:
    rec, upstream_url = recorder
    url = make_proxy(backends=backend(upstream_url, health_path="off"))
    reply = raw_request(url, target)
    status = int(reply.split(b" ", 2)[1])
    assert 400 <= status < 500, reply[:300]
    assert all(path.startswith("/v1/") and ".." not in path for _, path in rec.hits), rec.hits


def test_passthrough_still_reaches_v1_paths(make_proxy: Any, recorder: tuple[Recorder, str]) -> None:
    rec, upstream_url = recorder
    url = make_proxy(backends=backend(upstream_url, health_path="off"))
    for target in (b"/v1/models", b"/v1/models/deepseek-chat", b"/v1/files?purpose=batch", b"/v1/a%20b"):
        reply = raw_request(url, target)
        assert reply.startswith(b"HTTP/1.1 200"), (target, reply[:200])
    assert [path for _, path in rec.hits] == ["/v1/models", "/v1/models/deepseek-chat",
                                              "/v1/files?purpose=batch", "/v1/a%20b"]


def test_absolute_form_target_and_host_headers_do_not_pick_the_server(
        make_proxy: Any, recorder: tuple[Recorder, str], servers: ServerLoop) -> None:
    rec, upstream_url = recorder
    elsewhere = Recorder()
    runner, elsewhere_url = servers.run(serve(elsewhere.app()))
    try:
        url = make_proxy(backends=backend(upstream_url, health_path="off"))
        other = urlparse(elsewhere_url).netloc.encode()
        raw_request(url, b"http://" + other + b"/v1/models")
        raw_request(url, b"/v1/models",
                    b"X-Forwarded-Host: " + other + b"\r\nForwarded: host=" + other + b"\r\n")
        resp = requests.get(url + "/v1/models", headers={"Host": other.decode()}, timeout=10)
        assert resp.status_code == 200
        assert elsewhere.hits == []
        assert len(rec.hits) == 3
    finally:
        servers.run(runner.cleanup())
