"""Exact counter values on /metrics after a scripted mix of hits, misses, bypasses and coalesced
requests against a fresh proxy, and the savings report read from that proxy.

Expected tokens, USD, joules and grams are computed here from the usage the fake upstream put in
each answer, with ``config/prices.yaml`` and ``proxy.accounting`` (the same price table the proxy
loads). Integer counters must match exactly; money and energy to float rounding (the proxy adds
them in its own order).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests  # type: ignore[import-untyped]

from bench.fake_upstream import FakeUpstream
from proxy.accounting import PriceTable, account, parse_prices
from proxy.app import Overrides, build_app
from proxy.config import Config
from proxy.report import Sample, parse_exposition
from tests.conftest import ServerLoop, serve

ROOT = Path(__file__).resolve().parents[2]
PRICES = ROOT / "config" / "prices.yaml"
BACKEND = "deepseek"           # the name that has an energy profile in config/prices.yaml


def table() -> PriceTable:
    return parse_prices(PRICES.read_text(encoding="utf-8"))


def scrape(url: str) -> list[Sample]:
    return parse_exposition(requests.get(url + "/metrics", timeout=10).text)


def series(samples: list[Sample], name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """{label values: value} of every sample called ``name`` (counters: the _total samples)."""
    out = {}
    for s in samples:
        if s.name == name:
            out[tuple(s.labels.get(k, "") for k in labels)] = s.value
    return out


def close_enough(actual: dict[Any, float], expected: dict[Any, float]) -> bool:
    return actual.keys() == expected.keys() and all(
        math.isclose(actual[k], expected[k], rel_tol=1e-9, abs_tol=1e-12) for k in expected)


class Script:
    """Sends requests and records what each one should add to the counters."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[str, str, dict[str, Any]]] = []   # (source, model, usage)
        self.stored = 0

    def chat(self, question: str, *, expect: str, model: str = "deepseek-chat", stream: bool = False,
             headers: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": question}], **extra}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        resp = requests.post(self.url + "/v1/chat/completions", json=body, headers=headers or {},
                             timeout=30, stream=stream)
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-semcache"] == expect, (question, resp.headers["x-semcache"])
        usage = self._usage(resp, stream)
        self._record(expect, model, usage)
        return usage

    def completion(self, prompt: str, *, expect: str) -> dict[str, Any]:
        resp = requests.post(self.url + "/v1/completions", timeout=30,
                             json={"model": "deepseek-chat", "prompt": prompt, "max_tokens": 20})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-semcache"] == expect
        usage: dict[str, Any] = resp.json()["usage"]
        self._record(expect, "deepseek-chat", usage)
        return usage

    @staticmethod
    def _usage(resp: requests.Response, stream: bool) -> dict[str, Any]:
        if not stream:
            usage: dict[str, Any] = resp.json()["usage"]
            return usage
        found = None
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                chunk = orjson.loads(line[6:])
                if chunk.get("usage"):
                    found = chunk["usage"]
        assert found is not None, "the stream carried no usage chunk"
        return dict(found)

    def _record(self, result: str, model: str, usage: dict[str, Any]) -> None:
        source = {"miss": "backend", "bypass": "backend", "exact": "cache", "semantic": "cache",
                  "coalesced": "coalesced"}[result]
        self.events.append((source, model, usage))

    def wait_stored(self, more: int = 1) -> None:
        """Answers are stored just after they are sent: wait, so the next lookup sees them."""
        self.stored += more
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done = sum(series(scrape(self.url), "semcache_cache_store_total", "outcome").values())
            if done >= self.stored:
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.stored} answers were not offered to the cache in time")

    def expected(self, prices: PriceTable) -> dict[str, dict[tuple[str, ...], float]]:
        tokens: dict[tuple[str, ...], float] = defaultdict(float)
        usd: dict[tuple[str, ...], float] = defaultdict(float)
        unpriced: dict[tuple[str, ...], float] = defaultdict(float)
        joules: dict[tuple[str, ...], float] = defaultdict(float)
        co2: dict[tuple[str, ...], float] = defaultdict(float)
        for source, model, usage in self.events:
            figures = account(usage, model, BACKEND, prices)
            if figures.tokens_prompt:
                tokens["prompt", source] += figures.tokens_prompt
            if figures.tokens_completion:
                tokens["completion", source] += figures.tokens_completion
            if figures.usd is not None:
                usd[(source,)] += figures.usd
            else:
                unpriced[(source,)] += 1
            assert figures.method == "estimated"
            joules[source, "estimated"] += figures.joules
            co2[(source,)] += figures.co2_g
        return {"tokens": dict(tokens), "usd": dict(usd), "unpriced": dict(unpriced),
                "joules": dict(joules), "co2": dict(co2)}


@pytest.fixture
def slow(upstream: tuple[FakeUpstream, str]) -> Iterator[FakeUpstream]:
    fake, _ = upstream
    saved = fake.latency_s
    yield fake
    fake.latency_s = saved


def run_script(url: str, fake: FakeUpstream) -> Script:
    s = Script(url)
    s.chat("What is the capital of France?", expect="miss")                        # 1 miss
    s.wait_stored()
    s.chat("What is the capital of France?", expect="exact")                       # 2 exact hit
    s.chat("What is the capital of France?", expect="exact", stream=True)          # 3 exact, streamed
    s.chat("How do I reverse a list in Python?", expect="miss")                    # 4 miss
    s.wait_stored()
    s.chat("How can I reverse a list in Python?", expect="semantic")               # 5 semantic hit
    s.chat("Explain the rules of cricket briefly.", expect="miss", stream=True)    # 6 miss, streamed
    s.wait_stored()
    s.chat("Tell me a joke about cats.", expect="bypass",                          # 7 no-store
           headers={"Cache-Control": "no-store"})
    s.chat("Tell me a joke about dogs.", expect="bypass",                          # 8 no-cache
           headers={"Cache-Control": "no-cache"})
    s.wait_stored()
    s.chat("Name three prime numbers.", expect="bypass", n=2)                      # 9 n > 1
    s.chat("今天北京的天气怎么样？请简单回答。", expect="miss")                          # 10 language
    s.wait_stored()
    fake.latency_s = 0.6                                                           # 11 one call, 3 answers
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(lambda: requests.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "deepseek-chat", "messages": [{"role": "user", "content": "Why is the sky blue?"}]}))
            for _ in range(3)]
        answers = [f.result() for f in futures]
    fake.latency_s = 0.0
    states = sorted(a.headers["x-semcache"] for a in answers)
    assert states == ["coalesced", "coalesced", "miss"], states
    for answer in answers:
        s._record(answer.headers["x-semcache"], "deepseek-chat", answer.json()["usage"])
    s.wait_stored()
    s.chat("What does this unpriced model say?", expect="miss", model="mystery-model-1")  # 12 unpriced
    s.wait_stored()
    s.completion("Say hello to the world", expect="miss")                          # 13 completions
    s.wait_stored()
    return s


def test_counters_after_a_scripted_mix_are_exact(make_proxy: Any, upstream: tuple[FakeUpstream, str],
                                                 slow: FakeUpstream, tmp_path: Path) -> None:
    _, upstream_url = upstream
    url = make_proxy(backends=[{"name": BACKEND, "base_url": upstream_url, "api_key_env": None}],
                     accounting={"prices_file": str(PRICES)})
    calls_before = slow.calls
    script = run_script(url, slow)
    samples = scrape(url)
    expected = script.expected(table())

    # traffic
    assert series(samples, "semcache_requests_total", "route", "status_class") == {
        ("chat", "2xx"): 14, ("completions", "2xx"): 1}
    assert series(samples, "semcache_cache_lookups_total", "result") == {
        ("exact",): 2, ("semantic",): 1, ("miss",): 9, ("bypass",): 3}
    assert series(samples, "semcache_cache_bypass_total", "reason") == {
        ("no_store",): 1, ("no_cache",): 1, ("n_gt_1",): 1, ("language",): 1}
    assert series(samples, "semcache_coalesced_requests_total", "kind") == {("exact",): 2}
    assert slow.calls - calls_before == 10        # 15 requests - 3 hits - 2 coalesced
    assert sum(series(samples, "semcache_backend_request_duration_seconds_count", "backend").values()) == 10
    assert series(samples, "semcache_time_to_first_token_seconds_count", "result") == {
        ("hit",): 1, ("miss",): 1}
    assert series(samples, "semcache_cache_similarity_count", "outcome")[("hit",)] == 1

    # spent vs saved
    tokens = series(samples, "semcache_tokens_total", "kind", "source")
    assert tokens == expected["tokens"]                       # integers: exact
    sources = ("backend", "cache", "coalesced")
    assert set(tokens) == {(k, s) for k in ("prompt", "completion") for s in sources}
    assert close_enough(series(samples, "semcache_cost_usd_total", "source"), expected["usd"])
    assert series(samples, "semcache_unpriced_answers_total", "source") == {("backend",): 1}
    energy = series(samples, "semcache_energy_joules_total", "source", "method")
    assert close_enough(energy, expected["joules"])
    assert close_enough(series(samples, "semcache_co2_grams_total", "source"), expected["co2"])
    # stored: answers 1, 4, 6, 8 (no-cache still stores), 10, 11, 12, 13; not 7 (no-store) or 9 (n > 1)
    assert series(samples, "semcache_cache_entries")[()] == 8

    # the savings report, as a person runs it against this proxy
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "proxy", "report", "--url", url, "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["exact"] == 2 and report["semantic"] == 1 and report["coalesced"] == 2
    assert report["saved_calls"] == 5 and report["spent"]["calls"] == 10
    assert report["hit_ratio"] == pytest.approx(3 / 15)
    saved_usd = expected["usd"][("cache",)] + expected["usd"][("coalesced",)]
    assert report["saved"]["usd"] == pytest.approx(saved_usd, rel=1e-9)
    assert report["spent"]["usd"] == pytest.approx(expected["usd"][("backend",)], rel=1e-9)
    saved_j = expected["joules"][("cache", "estimated")] + expected["joules"][("coalesced", "estimated")]
    assert report["saved"]["kwh"] == pytest.approx(saved_j / 3.6e6, rel=1e-9)
    assert report["saved"]["co2_g"] == pytest.approx(
        expected["co2"][("cache",)] + expected["co2"][("coalesced",)], rel=1e-9)
    saved_tokens = sum(v for (_, src), v in expected["tokens"].items() if src != "backend")
    assert report["saved"]["tokens"] == saved_tokens

    chart = tmp_path / "savings.png"
    text = subprocess.run([sys.executable, "-m", "proxy", "report", "--url", url, "--png", str(chart)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "hit ratio                      20.0%" in text.stdout
    assert "saved calls" not in text.stderr
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text.stderr
    else:
        data = chart.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_fails_cleanly_without_a_proxy() -> None:
    out = subprocess.run([sys.executable, "-m", "proxy", "report", "--url", "http://127.0.0.1:9"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "cannot reach" in out.stderr


def test_report_refuses_a_bad_window() -> None:
    out = subprocess.run([sys.executable, "-m", "proxy", "report", "--prometheus", "http://127.0.0.1:9",
                          "--window", "an hour"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "not a Prometheus duration" in out.stderr


class SteadyPower:
    def __init__(self, watts: float) -> None:
        self.value = watts

    def watts(self) -> float:
        return self.value


def test_local_gpu_backend_energy_is_measured(servers: ServerLoop, upstream: tuple[FakeUpstream, str],
                                             embedder: Any, slow: FakeUpstream, tmp_path: Path) -> None:
    """A vllm-type backend with NVML (here a fake reader at 300 W): the pipeline passes the
    measured joules to accounting, which applies the local profile's PUE (1.5)."""
    _, upstream_url = upstream
    config = Config.model_validate({
        "backends": [{"name": "local", "type": "vllm", "base_url": upstream_url, "api_key_env": None}],
        "store": {"data_dir": str(tmp_path / "data")}, "accounting": {"prices_file": str(PRICES)}})
    overrides = Overrides(embedder=embedder, power_reader=SteadyPower(300.0))
    app = build_app(config, environ={}, overrides=overrides)
    runner, url = servers.run(serve(app))
    try:
        slow.latency_s = 0.4
        resp = requests.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "qwen-local", "messages": [{"role": "user", "content": "Measure my energy please"}]})
        assert resp.status_code == 200 and resp.headers["x-semcache"] == "miss"
        slow.latency_s = 0.0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            samples = scrape(url)
            if series(samples, "semcache_energy_joules_total", "source", "method"):
                break
            time.sleep(0.05)
        joules = series(samples, "semcache_energy_joules_total", "source", "method")
        assert set(joules) == {("backend", "measured")}
        # 300 W x ~0.4 s x PUE 1.5 (the call also spends a few ms in the batch window and relay)
        assert joules[("backend", "measured")] == pytest.approx(300 * 0.4 * 1.5, rel=0.35)
        co2 = series(samples, "semcache_co2_grams_total", "source")[("backend",)]
        assert co2 == pytest.approx(joules[("backend", "measured")] / 3.6e6 * 480, rel=1e-9)
        # a hit of that answer is saved energy, estimated from the profile (7,200 J per request x PUE)
        again = requests.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "qwen-local", "messages": [{"role": "user", "content": "Measure my energy please"}]})
        assert again.headers["x-semcache"] == "exact"
        saved = series(scrape(url), "semcache_energy_joules_total", "source", "method")
        assert saved[("cache", "estimated")] == pytest.approx(7200 * 1.5)
    finally:
        slow.latency_s = 0.0
        servers.run(runner.cleanup())
