"""Routing, failover, retries before the first byte, circuit breakers and health probes, through
the real proxy with two fake upstreams and a dead port; then the router alone with in-memory
backends for the cases that need exact control (cancellation, refusals, jitter)."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from bench.fake_upstream import FakeUpstream
from proxy.backends.router import Member, Router
from proxy.breaker import Breaker, BreakerSettings
from proxy.config import BackendConfig, Config
from proxy.errors import BackendFailure, BackendsUnavailable, Overloaded
from proxy.metrics import PrometheusMetrics
from proxy.ports import UpstreamRequest, UpstreamResponse
from proxy.retry import RetryPolicy
from tests.conftest import ProxyFactory, ServerLoop, serve

FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}
NO_PROBES = {"health_interval_s": 0}


@pytest.fixture(scope="module")
def second(servers: ServerLoop) -> Iterator[tuple[FakeUpstream, str]]:
    """A second fake upstream, so a test can tell which backend answered."""
    fake = FakeUpstream()
    runner, url = servers.run(serve(fake.app()))
    yield fake, url
    servers.run(runner.cleanup())


@pytest.fixture(scope="module")
def dead_url() -> Iterator[str]:
    """A loopback port that refuses connections: bound (so nobody else takes it), never listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def fakes(upstream: tuple[FakeUpstream, str], second: tuple[FakeUpstream, str]) -> Iterator[
        tuple[FakeUpstream, FakeUpstream]]:
    """(primary, fallback): ``second`` is tried first in these tests, the session upstream after."""
    primary, fallback = second[0], upstream[0]
    yield primary, fallback
    primary.down = False
    primary.stall_s = fallback.stall_s = 3600.0


def backend(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {**BackendConfig(name=name, base_url=url, api_key_env=None).model_dump(), **FAST, **extra}


def two_backends(make_proxy: ProxyFactory, first_url: str, fallback_url: str,
                 first: dict[str, Any] | None = None, routing: dict[str, Any] | None = None) -> str:
    return make_proxy(backends=[backend("primary", first_url, **(first or {})),
                                backend("fallback", fallback_url)],
                      routing={**NO_PROBES, **(routing or {})})


def ask(url: str, prompt: str, stream: bool = False, model: str = "deepseek-chat") -> requests.Response:
    body = {"model": model, "stream": stream,
            "messages": [{"role": "user", "content": f"{prompt} {uuid.uuid4().hex[:10]}"}]}
    return requests.post(url + "/v1/chat/completions", data=orjson.dumps(body), timeout=30, stream=stream,
                         headers={"Content-Type": "application/json"})


def events(resp: requests.Response) -> list[bytes]:
    return [line[6:] for line in resp.iter_lines() if line.startswith(b"data: ")]


def metric(url: str, name: str, **labels: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def readiness(url: str) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(url + "/readyz", timeout=10).json()
    return body


# -- failover -------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_dead_first_backend_is_answered_by_the_second(make_proxy: ProxyFactory, dead_url: str,
                                                      fakes: tuple[FakeUpstream, FakeUpstream],
                                                      upstream: tuple[FakeUpstream, str],
                                                      stream: bool) -> None:
    _, fallback = fakes
    url = two_backends(make_proxy, dead_url, upstream[1], first={"retries": 1})
    before = fallback.calls
    resp = ask(url, "Who answers when the first is dead?", stream=stream)
    assert resp.status_code == 200
    if stream:
        assert events(resp)[-1] == b"[DONE]"
    else:
        assert "Who answers" in resp.json()["choices"][0]["message"]["content"]
    assert fallback.calls == before + 1
    assert metric(url, "semcache_retries_total", backend="primary", reason="unreachable") == 1
    assert metric(url, "semcache_failovers_total", backend="primary") == 1


def test_models_route_only_to_matching_backends(make_proxy: ProxyFactory,
                                                fakes: tuple[FakeUpstream, FakeUpstream],
                                                upstream: tuple[FakeUpstream, str],
                                                second: tuple[FakeUpstream, str]) -> None:
    primary, fallback = fakes
    url = make_proxy(backends=[backend("primary", second[1], models=["local-*"]),
                               backend("fallback", upstream[1], models=["deepseek-*", "local-*"])],
                     routing=NO_PROBES)
    p, f = primary.calls, fallback.calls
    assert ask(url, "routed by model", model="local-llama").status_code == 200
    assert (primary.calls, fallback.calls) == (p + 1, f)
    assert ask(url, "routed by model", model="deepseek-chat").status_code == 200
    assert (primary.calls, fallback.calls) == (p + 1, f + 1)
    # local-* fails over to the second pattern match; deepseek-* has no second candidate
    primary.down = True
    assert ask(url, "local down", model="local-llama").status_code == 200
    assert fallback.calls == f + 2


def test_failover_can_be_turned_off(make_proxy: ProxyFactory, dead_url: str,
                                    fakes: tuple[FakeUpstream, FakeUpstream],
                                    upstream: tuple[FakeUpstream, str]) -> None:
    _, fallback = fakes
    url = two_backends(make_proxy, dead_url, upstream[1], first={"retries": 0},
                       routing={"failover": False})
    before = fallback.calls
    resp = ask(url, "no failover")
    assert resp.status_code == 502 and resp.json()["error"]["type"] == "upstream_error"
    assert fallback.calls == before


# -- retries before the first byte -------------------------------------------------------------------

@pytest.mark.parametrize(("fault", "calls"), [("FAULT:503x2", 3), ("FAULT:502x1", 2), ("FAULT:504x1", 2),
                                              ("FAULT:resetx2", 3)])
@pytest.mark.parametrize("stream", [False, True])
def test_flaky_backend_is_retried_then_succeeds(make_proxy: ProxyFactory,
                                                fakes: tuple[FakeUpstream, FakeUpstream],
                                                second: tuple[FakeUpstream, str],
                                                upstream: tuple[FakeUpstream, str],
                                                fault: str, calls: int, stream: bool) -> None:
    primary, fallback = fakes
    url = two_backends(make_proxy, second[1], upstream[1], first={"retries": 2})
    p, f = primary.calls, fallback.calls
    resp = ask(url, f"flaky {fault}", stream=stream)
    assert resp.status_code == 200
    if stream:
        assert events(resp)[-1] == b"[DONE]"
    assert primary.calls == p + calls and fallback.calls == f
    reason = "unreachable" if "reset" in fault else "http_" + fault[6:9]
    assert metric(url, "semcache_retries_total", backend="primary", reason=reason) == calls - 1
    # answered on a retry: the breaker saw a success at the end, and the answer was stored
    assert readiness(url)["backend.primary"] == "closed"


def test_retries_are_bounded_and_the_last_answer_passes_through(make_proxy: ProxyFactory,
                                                                fakes: tuple[FakeUpstream, FakeUpstream],
                                                                second: tuple[FakeUpstream, str],
                                                                upstream: tuple[FakeUpstream, str]) -> None:
    primary, fallback = fakes
    wide = {"failures": 100, "open_s": 1}     # this test is about retries, not the breaker
    url = make_proxy(backends=[backend("primary", second[1], retries=2, breaker=wide),
                               backend("fallback", upstream[1], retries=1, breaker=wide)],
                     routing=NO_PROBES)
    p, f = primary.calls, fallback.calls
    started = time.monotonic()
    resp = ask(url, "always FAULT:503")
    assert time.monotonic() - started < 5
    # 3 attempts on the first, 2 on the second, then the upstream's own 503 body goes back
    assert (primary.calls, fallback.calls) == (p + 3, f + 2)
    assert resp.status_code == 503
    assert resp.json()["error"]["message"] == "fake upstream answered 503"
    assert resp.headers["x-semcache"] == "miss"
    # never cached: the same question goes to the backends again
    p, f = primary.calls, fallback.calls
    again = requests.post(url + "/v1/chat/completions", data=resp.request.body, timeout=30,
                          headers={"Content-Type": "application/json"})
    assert again.status_code == 503 and primary.calls == p + 3


def test_a_long_retry_after_is_not_waited_for(make_proxy: ProxyFactory,
                                             fakes: tuple[FakeUpstream, FakeUpstream],
                                             second: tuple[FakeUpstream, str],
                                             upstream: tuple[FakeUpstream, str]) -> None:
    primary, fallback = fakes
    url = two_backends(make_proxy, second[1], upstream[1], first={"retries": 2})
    p, f = primary.calls, fallback.calls
    started = time.monotonic()
    resp = ask(url, "FAULT:503ra is busy for 30 s")
    assert time.monotonic() - started < 5
    # the first backend said "not for 30 s": no retry there, the second (same fault) is asked
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "30"
    assert (primary.calls, fallback.calls) == (p + 1, f + 1)


def test_first_byte_timeout_is_retried_then_fails_over(make_proxy: ProxyFactory,
                                                       fakes: tuple[FakeUpstream, FakeUpstream],
                                                       second: tuple[FakeUpstream, str],
                                                       upstream: tuple[FakeUpstream, str]) -> None:
    primary, fallback = fakes
    primary.stall_s = 2.0
    url = two_backends(make_proxy, second[1], upstream[1],
                       first={"retries": 1, "first_byte_timeout_s": 0.3})
    fallback.stall_s = 0.01     # the second stalls too, but well within its first-byte timeout
    p, f = primary.calls, fallback.calls
    resp = ask(url, "FAULT:slowheaders on the first")
    assert resp.status_code == 200 and primary.calls == p + 2
    assert metric(url, "semcache_retries_total", backend="primary", reason="timeout") == 1
    assert fallback.calls == f + 1


def test_streams_are_never_retried_after_the_first_byte(make_proxy: ProxyFactory,
                                                        fakes: tuple[FakeUpstream, FakeUpstream],
                                                        second: tuple[FakeUpstream, str],
                                                        upstream: tuple[FakeUpstream, str]) -> None:
    primary, fallback = fakes
    url = two_backends(make_proxy, second[1], upstream[1], first={"retries": 2})
    p, f = primary.calls, fallback.calls
    resp = ask(url, "break me FAULT:break", stream=True)
    assert resp.status_code == 200          # the headers had gone out when the stream broke
    data = events(resp)
    assert b"[DONE]" not in data
    last = orjson.loads(data[-1])
    assert "error" in last and last["error"]["code"] in ("upstream_unavailable", "stream_truncated")
    # exactly one upstream call: no retry, no failover once a byte went to the client
    assert (primary.calls, fallback.calls) == (p + 1, f)
    assert metric(url, "semcache_retries_total") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_429_passes_through_with_retry_after_and_no_retry(make_proxy: ProxyFactory,
                                                         fakes: tuple[FakeUpstream, FakeUpstream],
                                                         second: tuple[FakeUpstream, str],
                                                         upstream: tuple[FakeUpstream, str],
                                                         stream: bool) -> None:
    primary, fallback = fakes
    url = two_backends(make_proxy, second[1], upstream[1], first={"retries": 2})
    p, f = primary.calls, fallback.calls
    resp = ask(url, "FAULT:429 too fast", stream=stream)
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "7"
    assert resp.json()["error"]["message"] == "slow down"
    assert (primary.calls, fallback.calls) == (p + 1, f)
    assert readiness(url)["backend.primary"] == "closed"   # a 429 is an answer, not a failure


@pytest.mark.parametrize(("fault", "status"), [("FAULT:401", 401), ("FAULT:500", 500)])
def test_other_errors_pass_through_untouched(make_proxy: ProxyFactory,
                                            fakes: tuple[FakeUpstream, FakeUpstream],
                                            second: tuple[FakeUpstream, str],
                                            upstream: tuple[FakeUpstream, str],
                                            fault: str, status: int) -> None:
    primary, fallback = fakes
    url = two_backends(make_proxy, second[1], upstream[1])
    p, f = primary.calls, fallback.calls
    resp = ask(url, fault)
    assert resp.status_code == status and resp.json()["error"]["type"] == "upstream_test_error"
    assert (primary.calls, fallback.calls) == (p + 1, f)


# -- circuit breaker and health -----------------------------------------------------------------------

def test_breaker_opens_after_n_failures_and_recovers(make_proxy: ProxyFactory,
                                                     fakes: tuple[FakeUpstream, FakeUpstream],
                                                     second: tuple[FakeUpstream, str],
                                                     upstream: tuple[FakeUpstream, str]) -> None:
    primary, fallback = fakes
    url = two_backends(make_proxy, second[1], upstream[1],
                       first={"retries": 0, "breaker": {"failures": 2, "open_s": 1.0}})
    assert metric(url, "semcache_backend_up", backend="primary") == 1
    primary.down = True
    p, f = primary.calls, fallback.calls
    for _ in range(2):
        assert ask(url, "while primary is down").status_code == 200
    assert (primary.calls, fallback.calls) == (p + 2, f + 2)
    assert readiness(url)["backend.primary"] == "open"
    assert metric(url, "semcache_backend_up", backend="primary") == 0
    # open: skipped without a call
    assert ask(url, "primary skipped").status_code == 200
    assert (primary.calls, fallback.calls) == (p + 2, f + 3)
    # it comes back; after the cool-down one probe call goes through and closes the breaker
    primary.down = False
    time.sleep(1.2)
    assert readiness(url)["backend.primary"] == "half_open"
    assert ask(url, "primary is back").status_code == 200
    assert (primary.calls, fallback.calls) == (p + 3, f + 3)
    assert readiness(url)["backend.primary"] == "closed"
    assert metric(url, "semcache_backend_up", backend="primary") == 1
    assert metric(url, "semcache_backend_breaker_state", backend="primary", state="closed") == 1


def test_every_backend_open_gives_503_with_retry_after_fast(make_proxy: ProxyFactory, dead_url: str) -> None:
    url = make_proxy(backends=[backend("only", dead_url, retries=0, breaker={"failures": 1, "open_s": 30})],
                     routing=NO_PROBES)
    assert ask(url, "the first call finds it dead").status_code == 502
    for stream in (False, True):
        started = time.monotonic()
        resp = ask(url, "the breaker is open", stream=stream)
        assert time.monotonic() - started < 0.5
        assert resp.status_code == 503
        assert 1 <= int(resp.headers["Retry-After"]) <= 30
        error = resp.json()["error"]
        assert error["type"] == "overloaded_error" and error["code"] == "backend_unavailable"
    ready = readiness(url)
    assert ready["status"] == "ready" and ready["backend.only"] == "open"


def test_health_probes_open_an_idle_dead_backend_and_recover_it(make_proxy: ProxyFactory,
                                                                 fakes: tuple[FakeUpstream, FakeUpstream],
                                                                 second: tuple[FakeUpstream, str],
                                                                 upstream: tuple[FakeUpstream, str]) -> None:
    primary, _ = fakes
    primary.down = True
    url = make_proxy(backends=[backend("primary", second[1], type="vllm",
                                       breaker={"failures": 2, "open_s": 60}),
                               backend("fallback", upstream[1])],
                     routing={"health_interval_s": 0.1})

    def wait_for(key: str, value: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while True:
            ready = readiness(url)
            if ready.get(key) == value:
                return ready
            assert time.monotonic() < deadline, ready
            time.sleep(0.05)

    ready = wait_for("backend.primary", "open")        # no request needed
    assert ready["backend.primary.health"] == "failing" and ready["backend.fallback.health"] == "ok"
    p = primary.calls
    assert ask(url, "idle dead backend").status_code == 200
    assert primary.calls == p                           # skipped, not tried
    primary.down = False
    # passing probes: half-open, then closed, long before the 60 s cool-down would end
    ready = wait_for("backend.primary", "closed")
    assert ready["backend.primary.health"] == "ok"
    assert ask(url, "back in use").status_code == 200
    assert primary.calls == p + 1


def test_backend_urls_probe_their_own_health_paths() -> None:
    assert BackendConfig(type="vllm").health_url_path() == "/health"
    assert BackendConfig(type="openai").health_url_path() == "/v1/models"
    assert BackendConfig(health_path="/ping").health_url_path() == "/ping"
    assert BackendConfig(health_path="off").health_url_path() is None
    with pytest.raises(ValueError):
        BackendConfig(health_path="health")
    with pytest.raises(ValueError):
        Config.model_validate({"backends": [{"name": "a"}, {"name": "a"}]})


# -- the router alone, with in-memory backends ----------------------------------------------------------

class Scripted:
    """A Backend whose answers are scripted: an int is a status, an exception is raised, and
    "hang" waits until cancelled."""

    def __init__(self, name: str, script: list[Any]) -> None:
        self._name = name
        self.script = list(script)
        self.calls = 0

    @property
    def name(self) -> str:
        return self._name

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        self.calls += 1
        step = self.script.pop(0) if self.script else 200
        if step == "hang":
            await asyncio.Event().wait()
        if isinstance(step, BaseException):
            raise step
        return UpstreamResponse(int(step), {}, body=self._name.encode())

    async def start(self) -> None: ...

    async def close(self) -> None: ...


REQUEST = UpstreamRequest(method="POST", path="/v1/chat/completions", query="", headers={}, body=b"{}")


def make_router(*backends: Scripted, retries: int = 2, failures: int = 3) -> tuple[Router, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    members = [Member(b.name, b, Breaker(BreakerSettings(failures, 10.0), time.monotonic),
                      RetryPolicy(retries=retries, base_s=0.1, max_s=1.0)) for b in backends]
    metrics = PrometheusMetrics(CollectorRegistry(), backends=tuple(b.name for b in backends))
    router = Router(members, lambda model: [b.name for b in backends], metrics=metrics,
                    rand=lambda: 0.5, sleep=sleep)
    return router, slept


async def test_router_backoff_uses_full_jitter_and_names_the_answering_backend() -> None:
    a, b = Scripted("a", [503, BackendFailure("x"), 503]), Scripted("b", [])
    router, slept = make_router(a, b)
    route = router.route("m")
    assert route.name == "a"
    resp = await route.send(REQUEST)
    assert resp.body == b"b" and route.name == "b"
    assert (a.calls, b.calls) == (3, 1)
    assert slept == [0.05, 0.1]                      # rand 0.5 x caps 0.1, 0.2
    assert router.states() == {"a": "open", "b": "closed"}


async def test_router_refusal_from_a_backend_fails_over_without_retry_or_verdict() -> None:
    a, b = Scripted("a", [Overloaded("queue full", retry_after=1)]), Scripted("b", [])
    router, slept = make_router(a, b, failures=1)
    resp = await router.route("m").send(REQUEST)
    assert resp.body == b"b" and (a.calls, slept) == (1, [])
    assert router.states()["a"] == "closed"


async def test_router_cancelled_probe_frees_the_half_open_slot() -> None:
    a = Scripted("a", [BackendFailure("down"), "hang"])
    router, _ = make_router(a, retries=0, failures=1)
    with pytest.raises(BackendFailure):
        await router.route("m").send(REQUEST)
    with pytest.raises(BackendsUnavailable):
        await router.route("m").send(REQUEST)
    member = router._members["a"]
    member.breaker.recover()                           # as a passing health probe would
    task = asyncio.create_task(router.route("m").send(REQUEST))
    await asyncio.sleep(0.01)
    assert a.calls == 2
    with pytest.raises(BackendsUnavailable):           # the probe is out: nobody else goes
        await router.route("m").send(REQUEST)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    resp = await router.route("m").send(REQUEST)       # the slot was freed by the cancellation
    assert resp.status == 200 and router.states()["a"] == "closed"


async def test_router_closes_its_health_task() -> None:
    probes = 0

    async def probe() -> bool:
        nonlocal probes
        probes += 1
        return True

    a = Scripted("a", [])
    members = [Member("a", a, Breaker(BreakerSettings(), time.monotonic), RetryPolicy(), probe=probe)]
    router = Router(members, lambda model: ["a"],
                    metrics=PrometheusMetrics(CollectorRegistry(), backends=("a",)), health_interval_s=0.01)
    await router.start()
    await asyncio.sleep(0.05)
    await router.close()
    seen = probes
    await asyncio.sleep(0.05)
    assert seen >= 2 and probes == seen
