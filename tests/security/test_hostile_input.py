"""Invariant 5: hostile input gets a 4xx in OpenAI's error shape, never a 5xx, a crash, a hang or
unbounded memory. What tests/integration/test_bad_input.py does not cover already: slow bodies,
header abuse, non-UTF-8 headers, NaN/Infinity/huge numbers, undecodable bodies, compression bombs,
broken HTTP framing; then schemathesis fuzzing from /openapi.json, and hypothesis on the parsers
(SSE, JSON, validation, cache key) for the exceptions they may raise.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import socket
import threading
import time
from typing import Any
from urllib.parse import urlparse

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from proxy import schemas, streaming
from proxy.app import make_policy
from proxy.cachekey import parse_directives, plan
from proxy.config import Config
from proxy.errors import InvalidRequest
from proxy.openapi import document
from tests.security.conftest import backend

USER_X = b'[{"role": "user", "content": "x"}]}'
GOOD = b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "hostile input?"}]}'


def _complete(reply: bytes) -> bool:
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def raw_http(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are; the first reply (complete by its Content-Length), or what came
    before the server closed (or the timeout). A server that answers before reading a body may
    keep the socket open a while to drain it (aiohttp's lingering): that is not the reply's time."""
    where = urlparse(url)
    assert where.hostname is not None and where.port is not None
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as sock:
        # the server may answer and close before taking everything
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        reply = b""
        try:
            while not _complete(reply) and (chunk := sock.recv(65536)):
                reply += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return reply


def request_bytes(body: bytes = GOOD, headers: bytes = b"", path: bytes = b"/v1/chat/completions") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n" + headers
            + b"Connection: close\r\n\r\n" + body)


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/"), reply[:200]
    return int(reply.split(b" ", 2)[1])


def openai_error(reply: bytes) -> dict[str, Any]:
    body = orjson.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def alive(url: str) -> None:
    assert requests.get(url + "/healthz", timeout=5).status_code == 200
    resp = requests.post(url + "/v1/chat/completions", data=GOOD, timeout=10)
    assert resp.status_code == 200, resp.text


# -- bodies -------------------------------------------------------------------------------------


def test_body_trickled_byte_by_byte_times_out_with_400(make_proxy: Any) -> None:
    url = make_proxy(server={"body_timeout_s": 1.0})
    where = urlparse(url)
    assert where.hostname is not None and where.port is not None
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 1000\r\n\r\n")
        stop = threading.Event()

        def trickle() -> None:
            for byte in GOOD:
                if stop.wait(0.05):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        sender = threading.Thread(target=trickle, daemon=True)
        started = time.monotonic()
        sender.start()
        reply = sock.recv(65536)
        took = time.monotonic() - started
        stop.set()
    sender.join(5)
    assert status_of(reply) in (400, 408)
    assert openai_error(reply)["code"] == "body_timeout"
    assert 0.9 < took < 3.0, took
    alive(url)


def test_slow_body_on_the_passthrough_route_times_out_too(make_proxy: Any) -> None:
    url = make_proxy(server={"body_timeout_s": 1.0})
    started = time.monotonic()
    reply = raw_http(url, b"POST /v1/embeddings HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n"
                     b"Connection: close\r\n\r\n{", timeout=10)
    assert status_of(reply) == 400 and time.monotonic() - started < 3.0
    assert openai_error(reply)["code"] == "body_timeout"


def test_declared_50mb_body_is_refused_fast_without_reading(proxy: str) -> None:
    started = time.monotonic()
    reply = raw_http(proxy, b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 52428800\r\n"
                     b"Content-Type: application/json\r\n\r\n" + b"{" * 1000, timeout=10)
    assert status_of(reply) == 413
    assert time.monotonic() - started < 1.0
    assert openai_error(reply)["type"] == "invalid_request_error"
    alive(proxy)


def test_gzip_bomb_is_413_not_50mb_in_memory(make_proxy: Any) -> None:
    url = make_proxy(server={"max_body_bytes": 1 << 20})
    bomb = gzip.compress(b'{"model": "m", "messages": [], "pad": "' + b"0" * (50 << 20) + b'"}', 9)
    assert len(bomb) < 200_000
    reply = raw_http(url, request_bytes(bomb, b"Content-Encoding: gzip\r\n"))
    assert status_of(reply) == 413
    openai_error(reply)
    alive(url)


def test_undecodable_content_encoding_is_400(proxy: str) -> None:
    for encoding in (b"gzip", b"deflate", b"br"):
        reply = raw_http(proxy, request_bytes(GOOD, b"Content-Encoding: " + encoding + b"\r\n"))
        assert 400 <= status_of(reply) < 500, (encoding, reply[:300])
    alive(proxy)


def test_compressed_good_body_is_accepted(proxy: str) -> None:
    reply = raw_http(proxy, request_bytes(gzip.compress(GOOD), b"Content-Encoding: gzip\r\n"))
    assert status_of(reply) == 200


NUMBERS = [
    ("NaN", b"NaN"), ("Infinity", b"Infinity"), ("-Infinity", b"-Infinity"), ("1e400", b"1e400"),
    ("-1e400", b"-1e400"),
]


@pytest.mark.parametrize(("name", "value"), NUMBERS, ids=[n for n, _ in NUMBERS])
def test_non_finite_numbers_are_400(proxy: str, name: str, value: bytes) -> None:
    body = b'{"model": "m", "temperature": ' + value + b', "messages": [{"role": "user", "content": "x"}]}'
    reply = raw_http(proxy, request_bytes(body))
    assert status_of(reply) == 400, name
    assert openai_error(reply)["type"] == "invalid_request_error"


BODIES = [
    ("int past 64 bits", b'{"model": "m", "seed": 123456789012345678901234567890, "messages": '
     b'[{"role": "user", "content": "x"}]}'),
    ("max_tokens past 64 bits", b'{"model": "m", "max_tokens": 99999999999999999999999, "messages": '
     b'[{"role": "user", "content": "x"}]}'),
    ("absurd max_completion_tokens", b'{"model": "m", "max_completion_tokens": 1000000000, "messages": '
     b'[{"role": "user", "content": "x"}]}'),
    ("zero max_tokens", b'{"model": "m", "max_tokens": 0, "messages": ' + USER_X),
    ("float max_tokens", b'{"model": "m", "max_tokens": 1.5, "messages": ' + USER_X),
    ("model too long", b'{"model": "' + b"m" * 300 + b'", "messages": [{"role": "user", "content": "x"}]}'),
    ("messages object", b'{"model": "m", "messages": {"role": "user", "content": "x"}}'),
    ("message not an object", b'{"model": "m", "messages": ["x"]}'),
    ("null messages", b'{"model": "m", "messages": null}'),
    ("content part without type",
     b'{"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]}'),
    ("stream_options list", b'{"model": "m", "stream": true, "stream_options": [], "messages": '
     b'[{"role": "user", "content": "x"}]}'),
    ("include_usage string", b'{"model": "m", "stream": true, "stream_options": {"include_usage": "y"}, '
     b'"messages": [{"role": "user", "content": "x"}]}'),
    ("stop of numbers", b'{"model": "m", "stop": [1], "messages": [{"role": "user", "content": "x"}]}'),
    ("tools object", b'{"model": "m", "tools": {}, "messages": [{"role": "user", "content": "x"}]}'),
    ("n too large", b'{"model": "m", "n": 100000, "messages": [{"role": "user", "content": "x"}]}'),
    ("boolean temperature", b'{"model": "m", "temperature": true, "messages": ' + USER_X),
    ("duplicate keys, last bad", b'{"model": "m", "model": 5, "messages": ' + USER_X),
    ("utf-16 body", '{"model": "m", "messages": []}'.encode("utf-16")),
    ("bom", b'\xef\xbb\xbf' + GOOD),
    ("nul bytes", b"\x00" * 100),
    ("only whitespace", b" \n\t " * 100),
]


@pytest.mark.parametrize(("name", "body"), BODIES, ids=[n for n, _ in BODIES])
def test_more_bad_bodies_are_400(proxy: str, name: str, body: bytes) -> None:
    reply = raw_http(proxy, request_bytes(body))
    assert status_of(reply) == 400, (name, reply[:400])
    assert openai_error(reply)["type"] == "invalid_request_error"


def test_unknown_fields_everywhere_are_forwarded_not_refused(proxy: str) -> None:
    body: dict[str, Any] = {"model": "deepseek-chat", "x-vendor": {"deep": [1, {"a": None}]}, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "unknown fields again", "extra": 1}],
         "weird": True}], "stream_options": None, "response_format": {"type": "json_object"}}
    resp = requests.post(proxy + "/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 200, resp.text


def test_empty_and_odd_but_valid_messages_are_not_5xx(proxy: str) -> None:
    for messages in ([{"role": "user", "content": ""}], [{"role": "user"}],
                     [{"role": "assistant", "content": None}], [{"role": "user", "content": []}],
                     [{"role": "system", "content": "only a system prompt"}],
                     [{"role": "user", "content": "a\u0000b\u202e\ufeff"}]):
        resp = requests.post(proxy + "/v1/chat/completions", timeout=10,
                             json={"model": "deepseek-chat", "messages": messages})
        assert resp.status_code < 500, (messages, resp.text)


# -- headers and framing ------------------------------------------------------------------------

HEADER_ABUSE = [
    ("100 KB header", b"X-Big: " + b"a" * 100_000 + b"\r\n"),
    ("1000 headers", b"".join(b"X-H%d: v\r\n" % i for i in range(1000))),
    ("100 KB Authorization", b"Authorization: Bearer " + b"k" * 100_000 + b"\r\n"),
    ("100 KB cookie", b"Cookie: " + b"c=1; " * 20_000 + b"\r\n"),
]


@pytest.mark.parametrize(("name", "headers"), HEADER_ABUSE, ids=[n for n, _ in HEADER_ABUSE])
def test_header_abuse_is_4xx_and_the_server_survives(proxy: str, name: str, headers: bytes) -> None:
    started = time.monotonic()
    reply = raw_http(proxy, request_bytes(GOOD, headers))
    # most are refused by aiohttp's HTTP parser, before any handler runs: still OpenAI-shaped
    assert 400 <= status_of(reply) < 500, (name, reply[:200])
    assert openai_error(reply)["type"] == "invalid_request_error"
    assert time.monotonic() - started < 2.0
    alive(proxy)


NON_UTF8 = [b"Authorization: Bearer sk-\xff\xfe\x80", b"User-Agent: bot\xff\xc3\x28",
            b"OpenAI-Organization: org-\xff", b"x-semcache-threshold: 0.\xff9",
            b"Cache-Control: no-\xffcache",
            b"Content-Type: application/\xffjson", b"Accept: \xe9\xe9"]


@pytest.mark.parametrize("header", NON_UTF8)
def test_non_utf8_headers_are_not_5xx(proxy: str, header: bytes) -> None:
    reply = raw_http(proxy, request_bytes(GOOD, header + b"\r\n"))
    assert status_of(reply) < 500, reply[:300]


FRAMING = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"GET /v1/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: p\r\n\r\n",
    b"F\x00O /v1/models HTTP/1.1\r\nHost: p\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nX: a\r\n b\r\n\r\n",   # obsolete line folding
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,            # a TLS hello
]


@pytest.mark.parametrize("data", FRAMING, ids=[f"framing{i}" for i in range(len(FRAMING))])
def test_broken_http_framing_is_4xx_and_the_server_survives(proxy: str, data: bytes) -> None:
    reply = raw_http(proxy, data)
    if reply:   # the server may also just close the connection
        assert 400 <= status_of(reply) < 500, reply[:200]
        assert openai_error(reply)["type"] == "invalid_request_error"
    alive(proxy)


PARSER_ERRORS = [
    ("request-line", b"GET /v1/models HTTP/1.1 extra\r\nHost: p\r\n\r\n", b"extra"),
    ("header-name", b"GET /v1/models HTTP/1.1\r\nHost: p\r\nBad Header: x\r\n\r\n", b"Bad Header"),
    ("oversized-header", b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
     b"aaaaaaaa"),
    ("oversized-authorization", b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer sk-"
     + b"k" * 20_000 + b"\r\n\r\n", b"kkkkkkkk"),
    ("bad-method", b"G\x00T /v1/models HTTP/1.1\r\nHost: p\r\n\r\n", b"G\x00T"),
    ("bad-chunk-size", b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nhello\r\n0\r\n\r\n", b"zz"),
]


@pytest.mark.parametrize(("data", "echo"), [(d, e) for _, d, e in PARSER_ERRORS],
                         ids=[n for n, _, _ in PARSER_ERRORS])
def test_parser_errors_are_openai_shaped_and_quote_nothing(proxy: str, data: bytes, echo: bytes) -> None:
    """aiohttp's HTTP parser refuses these before routing and middlewares; the proxy's protocol
    handler (proxy/http_server.py) still answers in OpenAI's error shape, closes the connection
    (the stream position is unknown) and never sends the offending bytes back."""
    where = urlparse(proxy)
    assert where.hostname is not None and where.port is not None
    reply = b""
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):   # to EOF: a timeout here means it stayed open
                reply += chunk
    assert 400 <= status_of(reply) < 500, reply[:200]
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    error = openai_error(reply)
    assert error["type"] == "invalid_request_error"
    assert error["code"] in ("malformed_http", "request_too_large")
    assert error["message"].startswith("Malformed HTTP request")
    assert echo not in body
    alive(proxy)


def test_parser_refusals_are_counted(proxy: str) -> None:
    def refused() -> float:
        text = requests.get(proxy + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("semcache_requests_total{") and 'route="other"' in line
                   and 'status_class="4xx"' in line)

    before = refused()
    for _, data, _ in PARSER_ERRORS[:3]:
        assert status_of(raw_http(proxy, data)) == 400
    assert refused() == before + 3


def test_body_shorter_than_declared_then_hang_up(proxy: str) -> None:
    where = urlparse(proxy)
    assert where.hostname is not None and where.port is not None
    for _ in range(20):
        with socket.create_connection((where.hostname, where.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 500\r\n\r\n{\"mo")
    alive(proxy)


# -- schemathesis, from the published OpenAPI document ------------------------------------------


def test_openapi_document_is_served_and_describes_the_routes(proxy: str) -> None:
    resp = requests.get(proxy + "/openapi.json", timeout=10)
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/healthz", "/readyz", "/metrics",
            "/openapi.json"} <= set(doc["paths"])
    assert doc == document()
    # the bounds clients get refused for are in the document
    chat = doc["components"]["schemas"]["ChatRequest"]["properties"]
    assert chat["model"]["maxLength"] == 256 and chat["messages"]["minItems"] == 1
    temperature = chat["temperature"]["anyOf"][0]
    assert temperature["minimum"] == 0 and temperature["maximum"] == 2


def check_fuzz_reply(case: Any, url: str) -> tuple[int, str]:
    """One schemathesis case against the proxy: never a 5xx, every 4xx in OpenAI's shape;
    (status, error message)."""
    response = case.call(base_url=url, timeout=30)
    status = int(response.status_code)
    assert status < 500, (case.body, status, response.text[:300])
    if status >= 400:
        body = orjson.loads(response.content)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        return status, str(body["error"]["message"])
    return status, ""


def integral_float(value: Any) -> bool:
    """Whether a float with an integral value (3970.0), or an integer past 64 bits (which orjson,
    and so the proxy, reads as a float), is anywhere in ``value``: JSON Schema calls both integers."""
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, int) and not isinstance(value, bool):
        return not -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return any(integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(integral_float(v) for v in value)
    return False


FUZZED = (("/v1/chat/completions", "POST"), ("/v1/completions", "POST"))


@pytest.mark.parametrize("mode", [GenerationMode.NEGATIVE, GenerationMode.POSITIVE],
                         ids=["negative", "positive"])
@pytest.mark.parametrize(("path", "method"), FUZZED, ids=["chat", "completions"])
def test_schemathesis_fuzz_never_5xx(make_proxy: Any, lenient_upstream: tuple[Any, str],
                                     mode: GenerationMode, path: str, method: str) -> None:
    """50 generated cases per route and mode (200 in all); bench/fuzz.py runs 50,000+."""
    url = make_proxy(cache={"semantic": False}, backends=backend(lenient_upstream[1]))
    operation = schemathesis.openapi.from_dict(document())[path][method]
    statuses: list[tuple[int, str, Any]] = []

    @settings(max_examples=50, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        statuses.append((*check_fuzz_reply(case, url), case.body))

    fuzz()
    assert len(statuses) >= 25
    if mode is GenerationMode.POSITIVE:
        # valid input is served; the one rule JSON Schema cannot say: 3970.0 is an "integer"
        # there, but the proxy (as pydantic's StrictInt) wants it written 3970
        refused = [(status, message, body) for status, message, body in statuses if status != 200]
        assert all(status == 400 and integral_float(body) for status, _, body in refused), refused
        assert len(refused) < len(statuses), "no generated valid request was served"
    alive(url)


# -- hypothesis on the parsers ------------------------------------------------------------------

# integers within what orjson parses (i64 .. u64); floats of any size, which is where 1e20 lives
JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
                    | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_sse_parser_raises_nothing_but_sse_error_on_any_bytes(data: bytes, cuts: list[int]) -> None:
    parser = streaming.SSEParser(max_event_bytes=256)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    try:
        for a, b in itertools.pairwise(points):
            parser.feed(data[a:b])
        parser.finish()
    except streaming.SSEError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.lists(JSON | st.text(max_size=30), max_size=8), st.booleans())
def test_accumulators_never_raise_on_any_event(events: list[Any], chat: bool) -> None:
    acc: Any = streaming.ChatAccumulator() if chat else streaming.CompletionAccumulator()
    for item in events:
        data = item if isinstance(item, str) and not item.startswith("{") else orjson.dumps(item).decode()
        acc.add_event(streaming.SSEEvent(data=data))
    acc.result()
    # an arbitrary event sequence is complete only with [DONE] and no error recorded
    assert not acc.complete or (acc.saw_done and acc.error is None)


CHUNK = st.fixed_dictionaries({}, optional={
    "id": JSON, "model": JSON, "created": JSON,
    "usage": st.dictionaries(st.text(max_size=12), JSON, max_size=4) | st.none(),
    "choices": st.lists(st.fixed_dictionaries({}, optional={
        "index": JSON, "finish_reason": JSON, "logprobs": JSON, "text": JSON,
        "delta": st.fixed_dictionaries({}, optional={
            "role": JSON, "content": JSON, "reasoning_content": JSON, "refusal": JSON,
            "tool_calls": st.lists(st.fixed_dictionaries({}, optional={
                "index": JSON, "id": JSON, "type": JSON,
                "function": st.fixed_dictionaries({}, optional={"name": JSON, "arguments": JSON})}),
                max_size=3),
        })}), max_size=3)})


@settings(max_examples=80, deadline=None)
@given(st.lists(CHUNK, max_size=5), st.booleans())
def test_accumulators_survive_chunks_of_the_right_shape_with_wrong_types(chunks: list[dict[str, Any]],
                                                                        chat: bool) -> None:
    acc: Any = streaming.ChatAccumulator() if chat else streaming.CompletionAccumulator()
    for chunk in chunks:
        acc.add_event(streaming.SSEEvent(data=orjson.dumps(chunk).decode()))
    acc.add_event(streaming.SSEEvent(data="[DONE]"))
    result = acc.result()
    orjson.dumps(result)   # what would be stored is JSON


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_validation_raises_only_invalid_request(body: Any) -> None:
    for validate in (schemas.validate_chat, schemas.validate_completion):
        with contextlib.suppress(InvalidRequest):
            validate(body)


RULES = make_policy(Config()).rules
VALID_CHAT = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=20),
     "messages": st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["system", "user", "assistant", "tool"])},
         optional={"content": st.text() | st.none() | st.lists(st.fixed_dictionaries(
             {"type": st.sampled_from(["text", "image_url"])}, optional={"text": JSON}), max_size=3),
             "name": st.text(max_size=5), "extra": JSON}), min_size=1, max_size=4)},
    optional={"temperature": st.floats(0, 2), "n": st.integers(1, 4), "stream": st.booleans(),
              "user": st.text(max_size=5), "x": JSON})


@settings(max_examples=300, deadline=None)
@given(VALID_CHAT, st.text(max_size=20), st.text(max_size=10) | st.none(), st.text(max_size=10) | st.none())
def test_cache_key_plan_never_raises_for_a_valid_body(body: dict[str, Any], tenant: str,
                                                     cache_control: str | None,
                                                     threshold: str | None) -> None:
    schemas.validate_chat(body)
    the_plan = plan(body, tenant=tenant, route="chat", directives=parse_directives(cache_control, threshold),
                    rules=RULES)
    assert len(the_plan.key) == 64 and len(the_plan.scope) == 64


def test_request_json_parser_limits() -> None:
    """What read_json relies on: orjson refuses NaN, lone surrogates, invalid UTF-8 and deep
    nesting with JSONDecodeError (the RecursionError DESIGN.md warns about is json's, not orjson's)."""
    for bad in (b"[NaN]", b'"\\ud800"', b'"\xff"', b"[" * 100_000 + b"]" * 100_000, b"1e400"):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(bad)


def test_huge_integral_floats_anywhere_are_not_5xx(proxy: str) -> None:
    """Found by schemathesis: an unknown field holding 1.8446744073709552e+19 made the cache key
    turn it into an int past 64 bits, which orjson cannot encode (500)."""
    for value in (b"1.8446744073709552e+19", b"-1e300", b"1e19", b"9007199254740993.0"):
        body = b'{"model": "m", "x": ' + value + b', "messages": [{"role": "user", "content": "big floats"}]}'
        reply = raw_http(proxy, request_bytes(body))
        assert status_of(reply) == 200, (value, reply[:300])


def test_usage_that_is_not_an_object_is_refused() -> None:
    acc = streaming.ChatAccumulator()
    acc.add_event(streaming.SSEEvent(data='{"choices": [{"index": 0, "delta": {"content": "x"}, '
                                          '"finish_reason": "stop"}], "usage": [[1, 2]]}'))
    acc.add_event(streaming.SSEEvent(data="[DONE]"))
    assert acc.error is not None or acc.usage is None
    orjson.dumps(acc.result())
