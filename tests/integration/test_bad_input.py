"""Bad input gets an OpenAI-shaped 4xx, never a 500 or a hang, over real HTTP."""

from __future__ import annotations

from typing import Any

import pytest
import requests  # type: ignore[import-untyped]

GOOD = b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}'


def post(url: str, body: bytes, headers: dict[str, str] | None = None,
         path: str = "/v1/chat/completions") -> requests.Response:
    return requests.post(url + path, data=body, timeout=10,
                         headers={"Content-Type": "application/json", **(headers or {})})


def assert_openai_error(resp: requests.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error  # type: ignore[no-any-return]


CASES = [
    ("empty", b"", None),
    ("not json", b"{nope", None),
    ("truncated", GOOD[:-5], None),
    ("array", b"[1, 2]", None),
    ("string", b'"hello"', None),
    ("nan", b'{"model": "m", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}', None),
    ("invalid utf-8", b'{"model": "m\xff", "messages": []}', None),
    ("lone surrogate", b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("deep nesting", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "x": '
     + b"[" * 5000 + b"]" * 5000 + b"}", None),
    ("missing messages", b'{"model": "deepseek-chat"}', "messages"),
    ("empty messages", b'{"model": "deepseek-chat", "messages": []}', "messages"),
    ("missing model", b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    ("model wrong type", b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
    ("bad role", b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    ("content wrong type", b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', None),
    ("temperature string",
     b'{"model": "m", "temperature": "hot", "messages": [{"role": "user", "content": "x"}]}',
     "temperature"),
    ("temperature range", b'{"model": "m", "temperature": 9, "messages": [{"role": "user", "content": "x"}]}',
     "temperature"),
    ("absurd max_tokens", b'{"model": "m", "max_tokens": 100000000000, "messages": [{"role": "user", '
     b'"content": "x"}]}', "max_tokens"),
    ("negative n", b'{"model": "m", "n": -1, "messages": [{"role": "user", "content": "x"}]}', "n"),
    ("stream not bool", b'{"model": "m", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}',
     "stream"),
]


@pytest.mark.parametrize(("name", "body", "param"), CASES, ids=[c[0] for c in CASES])
def test_bad_chat_bodies_are_400(proxy: str, name: str, body: bytes, param: str | None) -> None:
    error = assert_openai_error(post(proxy, body), 400, param)
    assert error["type"] == "invalid_request_error"


def test_completions_validation(proxy: str) -> None:
    assert_openai_error(post(proxy, b'{"model": "m"}', path="/v1/completions"), 400, "prompt")


def test_declared_huge_body_is_413_without_reading(proxy: str) -> None:
    import socket
    from urllib.parse import urlparse

    where = urlparse(proxy)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 52428800\r\n\r\n")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    assert b'"invalid_request_error"' in reply


def test_streamed_oversize_body_is_413(make_proxy: Any) -> None:
    url = make_proxy(server={"max_body_bytes": 2048})

    def chunks() -> Any:
        for _ in range(10):
            yield b"x" * 1024

    resp = requests.post(url + "/v1/chat/completions", data=chunks(), timeout=10)
    assert_openai_error(resp, 413)


def test_unknown_fields_are_kept_and_forwarded(proxy: str, upstream: Any) -> None:
    fake, _ = upstream
    body = (b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "unknown fields?",'
            b' "x_custom": 1}], "vendor_knob": {"a": [1, 2]}}')
    resp = post(proxy, body)
    assert resp.status_code == 200
    assert fake.requests[-1]["vendor_knob"] == {"a": [1, 2]}
    assert fake.requests[-1]["messages"][0]["x_custom"] == 1


def test_unknown_path_and_method(proxy: str) -> None:
    assert_openai_error(requests.get(proxy + "/nope", timeout=10), 404)
    assert_openai_error(requests.get(proxy + "/v1/chat/completions", timeout=10), 405)


def test_no_secret_in_upstream_unreachable_error(make_proxy: Any) -> None:
    canary = "sk-canary-9f8e7d6c5b4a"
    url = make_proxy(environ={"CANARY_KEY": canary},
                     backends=[{"name": "dead", "base_url": "http://127.0.0.1:9",
                                "api_key_env": "CANARY_KEY"}])
    resp = post(url, GOOD)
    assert resp.status_code == 502
    assert canary not in resp.text
    assert_openai_error(resp, 502)
    metrics = requests.get(url + "/metrics", timeout=10).text
    assert canary not in metrics
