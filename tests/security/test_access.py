"""Who may read the aggregate pages and call the admin routes.

/metrics and the status page show every tenant's counters: with ``server.metrics_token_env`` set
they need that bearer token. Admin calls without an admin token are taken from loopback peers
only, and never when they carry a reverse proxy's headers (behind a proxy on the same host every
client is loopback). The CLI reaches the admin routes over plain HTTP and keeps working.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import pytest
import requests
from aiohttp.http_exceptions import LineTooLong
from pydantic import SecretStr

from proxy import report
from proxy.middleware import ParserErrorLog, bearer_matches
from tests.security.test_hostile_input import openai_error, raw_http, status_of

METRICS_TOKEN = "metrics-canary-5f1d2e"
ADMIN_TOKEN = "admin-canary-9c8b7a"
ASK: dict[str, Any] = {"model": "deepseek-chat",
                       "messages": [{"role": "user", "content": "who may read the counters?"}]}


def _is_openai_401(resp: requests.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error"


# -- /metrics and the status page ---------------------------------------------------------------


def test_metrics_and_status_page_need_the_token_when_one_is_set(make_proxy: Any) -> None:
    url = make_proxy(environ={"SEMCACHE_METRICS_TOKEN": METRICS_TOKEN})
    # traffic first, so there are counters that could leak
    assert requests.post(url + "/v1/chat/completions", json=ASK, timeout=30).status_code == 200
    good = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    wrong = [{}, {"Authorization": "Bearer nope"}, {"Authorization": METRICS_TOKEN},
             {"Authorization": f"Bearer {METRICS_TOKEN}x"}, {"Authorization": f"bearer  {METRICS_TOKEN}"},
             {"X-Api-Key": METRICS_TOKEN}]
    # the encoded path reaches the same handler: the check follows the matched route
    for path in ("/metrics", "/", "/%6Detrics", "/metrics?format=text"):
        for headers in wrong:
            resp = requests.get(url + path, headers=headers, timeout=10)
            _is_openai_401(resp)
            assert b"semcache_" not in resp.content and METRICS_TOKEN.encode() not in resp.content
        assert requests.head(url + path, timeout=10).status_code == 401
    metrics = requests.get(url + "/metrics", headers=good, timeout=10)
    assert metrics.status_code == 200 and b"semcache_requests_total" in metrics.content
    page = requests.get(url + "/", headers=good, timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # probes, the API and the document stay as they were: the token guards the aggregates only
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    assert requests.get(url + "/readyz", timeout=10).status_code == 200
    assert requests.get(url + "/openapi.json", timeout=10).status_code == 200
    again = requests.post(url + "/v1/chat/completions", json=ASK, timeout=30)
    assert again.status_code == 200 and again.headers["x-semcache"] == "exact"


def test_the_savings_report_sends_the_metrics_token(make_proxy: Any) -> None:
    url = make_proxy(environ={"SEMCACHE_METRICS_TOKEN": METRICS_TOKEN})
    assert requests.post(url + "/v1/chat/completions", json=ASK, timeout=30).status_code == 200
    assert requests.post(url + "/v1/chat/completions", json=ASK, timeout=30).headers["x-semcache"] == "exact"
    with pytest.raises(report.ReportError, match="HTTP 401"):
        report.from_proxy(url)
    summary = report.from_proxy(url, token=METRICS_TOKEN)
    assert summary.hits == 1


def test_metrics_stay_open_without_a_token(make_proxy: Any) -> None:
    # the default: nothing set in the environment, so nothing changes for existing scrapers
    url = make_proxy()
    assert requests.get(url + "/metrics", timeout=10).status_code == 200
    assert requests.get(url + "/", timeout=10).status_code == 200
    # metrics_token_env switched off: the variable in the environment is not read
    url = make_proxy(environ={"SEMCACHE_METRICS_TOKEN": METRICS_TOKEN}, server={"metrics_token_env": None})
    assert requests.get(url + "/metrics", timeout=10).status_code == 200


def test_bearer_matches_only_the_exact_header() -> None:
    token = SecretStr("t0k")
    assert bearer_matches("Bearer t0k", token)
    for sent in (None, "", "Bearer", "Bearer ", "Bearer t0", "Bearer t0k ", "t0k", "Basic t0k",
                 "Bearer t0k\udcff", "\udcff"):
        assert not bearer_matches(sent, token), sent


def test_header_that_is_not_utf8_is_a_401_not_a_500(make_proxy: Any) -> None:
    url = make_proxy(environ={"SEMCACHE_METRICS_TOKEN": METRICS_TOKEN, "SEMCACHE_ADMIN_TOKEN": ADMIN_TOKEN})
    for path in (b"/metrics", b"/", b"/admin/cache/stats"):
        reply = raw_http(url, b"GET " + path + b" HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer \xff\xfe"
                         b"\r\nConnection: close\r\n\r\n")
        assert status_of(reply) == 401, reply[:300]
        assert openai_error(reply)["type"] == "authentication_error"


# -- admin routes without a token ---------------------------------------------------------------

PROXY_HEADERS = [("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=203.0.113.7"),
                 ("X-Forwarded-Host", "proxy.example"), ("X-Real-IP", "203.0.113.7"),
                 ("Via", "1.1 nginx"), ("x-forwarded-for", "127.0.0.1")]


@pytest.mark.parametrize(("name", "value"), PROXY_HEADERS, ids=[n for n, _ in PROXY_HEADERS])
def test_tokenless_admin_calls_through_a_reverse_proxy_are_refused(make_proxy: Any, name: str,
                                                                   value: str) -> None:
    url = make_proxy()
    # positive control: a plain loopback caller is the operator on the host
    assert requests.get(url + "/admin/cache/stats", timeout=10).status_code == 200
    for method, path in (("GET", "/admin/cache/stats"), ("POST", "/admin/cache/flush"),
                         ("GET", "/admin/debug/runtime"), ("POST", "/admin/cache/explain")):
        resp = requests.request(method, url + path, headers={name: value}, json=ASK, timeout=10)
        _is_openai_401(resp)


def test_an_admin_token_is_accepted_through_a_reverse_proxy(make_proxy: Any) -> None:
    url = make_proxy(environ={"SEMCACHE_ADMIN_TOKEN": ADMIN_TOKEN})
    forwarded = {"X-Forwarded-For": "203.0.113.7", "Via": "1.1 nginx"}
    _is_openai_401(requests.get(url + "/admin/cache/stats", headers=forwarded, timeout=10))
    _is_openai_401(requests.get(url + "/admin/cache/stats", timeout=10))   # loopback is no pass
    resp = requests.get(url + "/admin/cache/stats", timeout=10,
                        headers={**forwarded, "Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status_code == 200 and resp.json()["enabled"] is True


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "cache", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_cli_reaches_the_admin_routes_with_and_without_a_token(make_proxy: Any) -> None:
    url = make_proxy()
    done = _cli("stats", "--url", url)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["enabled"] is True
    url = make_proxy(environ={"SEMCACHE_ADMIN_TOKEN": ADMIN_TOKEN})
    assert _cli("stats", "--url", url).returncode != 0          # the token is needed now
    done = _cli("stats", "--url", url, "--token", ADMIN_TOKEN)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["enabled"] is True


# -- what aiohttp logs about requests its parser refuses -----------------------------------------


def test_parser_error_records_lose_the_bytes_and_the_traceback() -> None:
    secret = "sk-in-a-bad-header"
    try:
        raise LineTooLong(f"Bearer {secret}" + "x" * 100, "8190")
    except LineTooLong as exc:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                   "Error handling request from %s", ("127.0.0.1",), (type(exc), exc, None))
    assert ParserErrorLog().filter(record)
    line = logging.Formatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING refused a malformed HTTP request from 127.0.0.1: LineTooLong (status 400)"
    assert secret not in line and record.exc_info is None
    # anything else passes untouched
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                              ("127.0.0.1",), (RuntimeError, RuntimeError("boom"), None))
    assert ParserErrorLog().filter(other)
    assert other.levelno == logging.ERROR and other.exc_info is not None
