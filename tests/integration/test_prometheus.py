"""Every PromQL expression in dashboards/*.json, evaluated by a real Prometheus scraping proxies.

Debian's ``prometheus`` is installed when absent (as root; the Makefile does the same). It scrapes
two proxies (job ``semcache``) every second while a script drives traffic that makes every series
the dashboards read exist: hits of each kind, misses, streams, bypasses, guard refusals,
coalescing, retries and failover, backend errors, an unpriced model, a measured local GPU backend,
cache faults. Each expression must parse and return a non-empty result.

Independently of Prometheus, a dashboard that names a metric the proxy does not export fails
``test_dashboards_name_only_exported_metrics``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests  # type: ignore[import-untyped]

from bench.fake_upstream import FakeUpstream
from proxy.app import Overrides, build_app
from proxy.config import Config
from proxy.report import from_prometheus
from tests.conftest import ServerLoop, serve
from tests.prometheus_server import PrometheusServer, ensure_tool, install_failure

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
JOB = "semcache"
#: what Grafana would put in for its variables; windows wide enough for a 1 s scrape interval
VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "10m", "${job}": JOB, "$job": JOB}

#: metrics a dashboard may name before the feature that exports them is in the tree:
#: name -> why. Their expressions are skipped (and listed) while the proxy does not export them;
#: once it does, they must return data like every other expression.
EXPECTED_MISSING: dict[str, str] = {}

METRIC = re.compile(r"\bsemcache_[a-z0-9_]+")


@dataclass(frozen=True)
class Expr:
    board: str
    panel: str
    ref: str
    expr: str

    def __str__(self) -> str:
        return f"{self.board} / {self.panel} / {self.ref}: {self.expr}"

    @property
    def metrics(self) -> set[str]:
        return set(METRIC.findall(self.expr))

    def promql(self) -> str:
        text = self.expr
        for name, value in VARIABLES.items():
            text = text.replace(name, value)
        assert "$" not in text, f"unknown Grafana variable in {self}"
        return text


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs() -> list[Expr]:
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append(Expr(path.name, panel.get("title", "?"), target.get("refId", "?"),
                                      target["expr"]))
    return found


def exported(metrics_text: str) -> set[str]:
    """Sample names the proxy exports (from # TYPE lines, so also metrics with no series yet)."""
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "counter":
                names |= {name, name.removesuffix("_total") + "_total"}
            else:
                names.add(name)
    return names


def test_dashboards_exist_and_have_expressions() -> None:
    assert {p.name for p in DASHBOARDS} >= {"overview.json", "savings.json", "cache-quality.json",
                                            "batching.json"}
    exprs = dashboard_exprs()
    assert len(exprs) > 40
    for e in exprs:
        for selector in re.findall(r"semcache_[a-z0-9_]+(\{[^}]*\}|\[|\)|\s)", e.expr):
            assert selector.startswith("{") and 'job=~"$job"' in selector, f"no $job filter: {e}"


def test_dashboards_name_only_exported_metrics(proxy: str) -> None:
    names = exported(requests.get(proxy + "/metrics", timeout=10).text)
    unknown = {m: str(e) for e in dashboard_exprs() for m in e.metrics
               if m not in names and m not in EXPECTED_MISSING}
    assert not unknown, f"dashboards name metrics the proxy does not export: {unknown}"
    stale = [m for m in EXPECTED_MISSING if m in names]
    assert not stale, f"now exported, take them off EXPECTED_MISSING: {stale}"


# ------------------------------------------------------------------ the real Prometheus


class SteadyPower:
    def watts(self) -> float:
        return 250.0


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
          path: str = "/v1/chat/completions") -> requests.Response:
    resp = requests.post(url + path, json=body, headers=headers or {}, timeout=60,
                         stream=bool(body.get("stream")))
    if body.get("stream"):
        _ = resp.content  # read the whole stream
    return resp


def _chat(url: str, text: str, model: str = "deepseek-chat", expect: int = 200, **extra: Any) -> str:
    headers = extra.pop("headers", None)
    resp = _post(url, {"model": model, "messages": [{"role": "user", "content": text}], **extra}, headers)
    assert resp.status_code == expect, (text, resp.status_code, resp.text[:300])
    return str(resp.headers.get("x-semcache", ""))


def _settle(url: str, text: str, model: str = "deepseek-chat", within_s: float = 5.0) -> None:
    """Answers are stored just after they are sent: wait until ``text`` is stored and indexed."""
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        found = requests.post(url + "/admin/cache/explain", json=body, timeout=10).json()
        neighbours = found.get("neighbours", [])
        if found.get("exact_hit") and any(n.get("key") == found.get("key") for n in neighbours):
            return
        time.sleep(0.05)


def drive(main: str, faulty: str, fake: FakeUpstream, phase: int) -> None:
    """One round of traffic; every round makes fresh misses so that rates move."""
    tag = f"(round {phase})"
    assert _chat(main, f"What is the capital of France? {tag}") == "miss"
    _settle(main, f"What is the capital of France? {tag}")
    assert _chat(main, f"What is the capital of France? {tag}") == "exact"
    assert _chat(main, f"What is the capital of France? {tag}", stream=True) == "exact"
    assert _chat(main, f"Explain the offside rule in football. {tag}", stream=True) == "miss"
    _chat(main, "How do I reverse a list in Python?")
    _settle(main, "How do I reverse a list in Python?")
    assert _chat(main, "How can I reverse a list in Python?") == "semantic"
    _chat(main, "Is it safe to eat raw eggs?")
    _settle(main, "Is it safe to eat raw eggs?")
    _chat(main, "Is it not safe to eat raw eggs?")                     # guard refusal (first round)
    _chat(main, f"Tell me a joke about cats {tag}", headers={"Cache-Control": "no-store"})
    _chat(main, f"Tell me a joke about dogs {tag}", headers={"Cache-Control": "no-cache"})
    _chat(main, f"Name three prime numbers {tag}", n=2)
    _chat(main, f"今天北京的天气怎么样？{phase}")
    _chat(main, f"What does the unpriced model say? {tag}", model="mystery-model")
    _chat(main, f"Please fail FAULT:500 {tag}", expect=500)
    _chat(main, f"Cut the stream short FAULT:nodone {tag}", stream=True)
    _chat(main, f"Flaky first two calls FAULT:503x2 {tag}")           # retry, then failover
    assert _chat(main, f"Run me on the local GPU {tag}", model="local-model") == "miss"
    _settle(main, f"Run me on the local GPU {tag}", model="local-model")
    assert _chat(main, f"Run me on the local GPU {tag}", model="local-model") == "exact"
    resp = _post(main, {"model": "deepseek-chat", "prompt": f"Say hello {tag}", "max_tokens": 10},
                 path="/v1/completions")
    assert resp.status_code == 200
    fake.latency_s = 0.5
    try:
        with ThreadPoolExecutor(4) as pool:
            states = list(pool.map(lambda _: _chat(main, f"Why is the sky blue? {tag}"), range(4)))
    finally:
        fake.latency_s = 0.0
    assert sorted(states) == ["coalesced"] * 3 + ["miss"], states
    for i in range(2):
        _chat(faulty, f"A lookup that times out {tag} {i}")            # cache errors on the other replica


@dataclass
class Env:
    prometheus: PrometheusServer
    main: str
    faulty: str
    skipped: dict[str, str]


@pytest.fixture(scope="module")
def env(servers: ServerLoop, upstream: tuple[FakeUpstream, str], embedder: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    binary = ensure_tool("prometheus", "prometheus")
    if binary is None:
        pytest.skip(f"Debian's prometheus is not available: {install_failure('prometheus')}")
    fake, upstream_url = upstream
    tmp = tmp_path_factory.mktemp("prometheus-env")
    prices = str(ROOT / "config" / "prices.yaml")

    def backend(name: str, models: list[str], **extra: Any) -> dict[str, Any]:
        return {"name": name, "base_url": upstream_url, "api_key_env": None, "models": models,
                "backoff_base_s": 0.01, "backoff_max_s": 0.02, **extra}

    main_config = Config.model_validate({
        "backends": [backend("local", ["local-*"], type="vllm"),
                     backend("deepseek", ["deepseek-*"], retries=1), backend("fallback", ["*"])],
        # the proxy's own embedder (its batches are measured), from the export the session made
        "embedding": {"cache_dir": str(embedder._config.cache_dir)},
        "store": {"data_dir": str(tmp / "main")}, "accounting": {"prices_file": prices}})
    faulty_config = Config.model_validate({
        "backends": [backend("deepseek", ["*"])], "cache": {"lookup_timeout_s": 1e-6},
        "store": {"data_dir": str(tmp / "faulty")}, "accounting": {"prices_file": prices}})
    runners = []
    try:
        for config, overrides in ((main_config, Overrides(power_reader=SteadyPower())),
                                  (faulty_config, Overrides(embedder=embedder))):
            runners.append(servers.run(serve(build_app(config, environ={}, overrides=overrides))))
        (_, main), (_, faulty) = runners
        names = exported(requests.get(main + "/metrics", timeout=10).text)
        skipped = {m: why for m, why in EXPECTED_MISSING.items() if m not in names}
        prometheus = PrometheusServer(binary, tmp / "prom", {JOB: [u.removeprefix("http://")
                                                                  for u in (main, faulty)]})
        prometheus.start()
        try:
            prometheus.wait_scraped(1)
            drive(main, faulty, fake, 1)
            prometheus.wait_scraped(2)
            drive(main, faulty, fake, 2)
            prometheus.wait_scraped(3)
            yield Env(prometheus, main, faulty, skipped)
        finally:
            prometheus.stop()
    finally:
        for runner, _ in runners:
            servers.run(runner.cleanup())


def test_every_dashboard_expression_returns_data(env: Env) -> None:
    failures, skipped = [], []
    for e in dashboard_exprs():
        missing = e.metrics & env.skipped.keys()
        if missing:
            skipped.append(f"{e} ({'; '.join(env.skipped[m] for m in missing)})")
            continue
        try:
            result = env.prometheus.query(e.promql())
        except Exception as exc:
            failures.append(f"{e}\n    -> {exc}")
            continue
        if not result:
            failures.append(f"{e}\n    -> empty result")
        elif all(r["value"][1] in ("NaN", "+Inf", "-Inf") for r in result):
            failures.append(f"{e}\n    -> no number, only {result}")
    if skipped:
        print("expected-missing, not evaluated:\n  " + "\n  ".join(skipped))
    assert not failures, f"{len(failures)} dashboard expressions failed:\n" + "\n".join(failures)


def test_the_job_variable_finds_the_proxies(env: Env) -> None:
    # label_values(semcache_requests_total, job), as Grafana's variable query asks it
    jobs = env.prometheus.api("label/job/values", **{"match[]": "semcache_requests_total"})
    assert jobs == [JOB]
    health = env.prometheus.targets_up()
    assert len(health) == 2 and set(health.values()) == {"up"}


def test_counters_reach_prometheus_with_their_labels(env: Env) -> None:
    q = env.prometheus.query
    energy = {(r["metric"]["source"], r["metric"]["method"])
              for r in q(f'sum by (source, method) (semcache_energy_joules_total{{job="{JOB}"}})')}
    assert {("backend", "measured"), ("backend", "estimated"), ("cache", "estimated")} <= energy
    bypass = q(f'sum by (reason) (semcache_cache_bypass_total{{job="{JOB}"}})')
    reasons = {r["metric"]["reason"] for r in bypass}
    assert {"no_store", "no_cache", "n_gt_1", "language"} <= reasons
    errors = q(f'sum(semcache_cache_errors_total{{job="{JOB}",operation="lookup"}})')
    assert float(errors[0]["value"][1]) >= 4


def test_report_reads_prometheus(env: Env) -> None:
    summary = from_prometheus(env.prometheus.url, "10m", f'job="{JOB}"')
    assert summary.hits > 0 and summary.coalesced > 0 and summary.saved_calls > summary.hits
    assert summary.saved.usd > 0 and summary.spent.usd > 0
    assert summary.saved.joules > 0 and summary.measured_joules > 0 and summary.spent.unpriced > 0
    assert summary.entries is not None and summary.entries > 0
    out = subprocess.run([sys.executable, "-m", "proxy", "report", "--prometheus", env.prometheus.url,
                          "--window", "10m", "--selector", f'job="{JOB}"'], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "last 10m" in out.stdout and "hit ratio" in out.stdout and "measured (NVML)" in out.stdout
