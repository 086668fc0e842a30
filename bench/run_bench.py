"""Direct vs proxy benchmark on loopback: miss, exact-hit, semantic-hit and streaming paths.

    OMP_NUM_THREADS=1 python -m bench.run_bench --quick          # ~2 minutes
    OMP_NUM_THREADS=1 python -m bench.run_bench                  # ~8 minutes
    OMP_NUM_THREADS=1 python -m bench.run_bench --profile /tmp/prof   # + py-spy profiles of the hit paths

Starts the fake upstream (0 ms latency) and two proxies (``bench/configs/cache_off.yaml`` and
``cache_on.yaml``) as subprocesses on free loopback ports, then runs every scenario ``--reps``
times, each run in a fresh ``bench.loadgen`` process. Per run it records req/s, p50, p99 (and time
to first byte for streams), the CPU time per request of the proxy, the upstream and the client
(from /proc utime+stime around the measured part only) and the proxy's peak RSS. Direct runs
(client -> upstream) are made in every repetition, so each proxy figure has a direct figure from
the same moment; the tables show medians over the repetitions, ratios are medians of per-run ratios.
Markdown goes to stdout, the full figures to ``bench/results/bench-<time>.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procs import (
    ROOT,
    Service,
    bench_env,
    free_port,
    get_json,
    http_get,
    http_post,
    start_proxy,
    start_upstream,
)

HERE = Path(__file__).resolve().parent
PAIRS = HERE / "data" / "semantic_pairs.json.gz"
MODEL = "deepseek-chat"
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    target: str            # direct | off | on
    c: int
    stream: bool = False
    kind: str = "unique"   # unique | exact | exact-long | paraphrase
    expect: str = "none"   # the x-semcache value every answer should carry


def scenarios() -> list[Scenario]:
    out: list[Scenario] = []
    for c in (1, 32):
        out += [
            Scenario("direct", "direct (client -> upstream)", "direct", c),
            Scenario("off-miss", "proxy, cache off (miss)", "off", c, expect="bypass"),
            Scenario("on-miss", "proxy, cache on, unique (miss: embed+search+store)", "on", c,
                     expect="miss"),
            Scenario("exact-hit", "proxy, exact hit", "on", c, kind="exact", expect="exact"),
            Scenario("exact-hit-long", "proxy, exact hit, 4 KB prompt", "on", c, kind="exact-long",
                     expect="exact"),
            Scenario("semantic-hit", "proxy, semantic hit", "on", c, kind="paraphrase",
                     expect="semantic"),
        ]
    out += [
        Scenario("direct-stream", "direct, streamed", "direct", 1, stream=True),
        Scenario("off-stream", "proxy, cache off, streamed miss", "off", 1, stream=True, expect="bypass"),
        Scenario("on-stream-miss", "proxy, cache on, streamed miss", "on", 1, stream=True, expect="miss"),
        Scenario("exact-stream-hit", "proxy, streamed exact hit", "on", 1, stream=True, kind="exact",
                 expect="exact"),
        Scenario("semantic-stream-hit", "proxy, streamed semantic hit", "on", 1, stream=True,
                 kind="paraphrase", expect="semantic"),
    ]
    return out


@dataclass(frozen=True)
class Goal:
    metric: str
    op: str                # "<=" | ">="
    value: float
    text: str

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.value if self.op == "<=" else value >= self.value


GOALS: dict[tuple[str, int], Goal] = {
    ("off-miss", 1): Goal("proxy_cpu_ms", "<=", 0.5, "CPU <= 0.5 ms/req"),
    ("off-miss", 32): Goal("proxy_cpu_ms", "<=", 0.5, "CPU <= 0.5 ms/req"),
    ("exact-hit", 1): Goal("proxy_cpu_ms", "<=", 0.3, "CPU <= 0.3 ms/req"),
    ("exact-hit", 32): Goal("proxy_cpu_ms", "<=", 0.3, "CPU <= 0.3 ms/req"),
    ("exact-hit-long", 1): Goal("proxy_cpu_ms", "<=", 0.3, "CPU <= 0.3 ms/req"),
    ("exact-hit-long", 32): Goal("proxy_cpu_ms", "<=", 0.3, "CPU <= 0.3 ms/req"),
    ("semantic-hit", 1): Goal("p50_ms", "<=", 10.0, "p50 <= 10 ms"),
    ("semantic-hit", 32): Goal("rps", ">=", 300.0, ">= 300 req/s"),
}


@dataclass
class Sizes:
    reps: int
    n1: int                # requests per run at c=1
    n32: int               # requests per run at c=32
    nstream: int           # requests per streamed run (c=1)
    seeds: int             # questions seeded once for the c=1 semantic runs (plain and streamed)
    seeds32: int           # questions seeded afresh before every c=32 semantic run
    max_seconds: float     # time bound per run

    def requests(self, sc: Scenario) -> int:
        if sc.stream:
            return self.nstream
        return self.n1 if sc.c == 1 else self.n32


QUICK = Sizes(reps=2, n1=500, n32=1000, nstream=150, seeds=300, seeds32=300, max_seconds=5)
FULL = Sizes(reps=5, n1=1000, n32=3000, nstream=400, seeds=1000, seeds32=600, max_seconds=10)


# -- workload -------------------------------------------------------------------------------------

def load_pairs(path: Path = PAIRS, *, allow_case: bool = False) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        pairs: list[dict[str, Any]] = json.load(handle)["pairs"]
    return [p for p in pairs if allow_case or p["kind"] != "case"]


def vocabulary(pairs: list[dict[str, Any]]) -> list[str]:
    words = {w.lower() for p in pairs for w in re.findall(r"[A-Za-z]{4,10}", p["q"])}
    return sorted(words)


class Prompts:
    """Unique prompts that are also far apart in meaning (random word lists), so a cache-on
    "miss" scenario measures misses, not accidental semantic hits between similar prompts."""

    def __init__(self, words: list[str], seed: int) -> None:
        self._words = words
        self._rng = random.Random(seed)
        self._seen: set[str] = set()

    def take(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            text = "Tell me about " + " ".join(self._rng.sample(self._words, 9)) + "?"
            if text not in self._seen:
                self._seen.add(text)
                out.append(text)
        return out


def chat_body(prompt: str, stream: bool = False) -> str:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 64}
    if stream:
        body["stream"] = True
    return json.dumps(body)


# -- one run --------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def metrics_sample(base: str, names: tuple[str, ...]) -> dict[str, float]:
    status, text = http_get(base + "/metrics")
    out = dict.fromkeys(names, 0.0)
    if status != 200:
        return out
    for line in text.decode().splitlines():
        for name in names:
            if line.startswith((name + " ", name + "{")):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


EMBED_METRICS = ("semcache_embedding_batch_size_sum", "semcache_embedding_batch_size_count",
                 "semcache_cache_errors_total")


def run_load(spec: dict[str, Any], watch: dict[str, Service], tmp: Path,
             on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    """One loadgen process; CPU of the watched services is read around the measured part."""
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps(spec))
    for svc in watch.values():
        svc.reset_peak_rss()
    proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(spec_path)], cwd=ROOT,
                            env=bench_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    ready = json.loads(proc.stdout.readline() or "{}")
    if not ready.get("ready"):
        proc.kill()
        raise RuntimeError("load generator failed during warm-up")
    before = {name: svc.cpu_s() for name, svc in watch.items()}
    if on_ready is not None:
        on_ready()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result: dict[str, Any] = json.loads(proc.stdout.readline())
    proc.wait(30)
    time.sleep(0.2)  # let tracked background work (cache stores) finish inside the window
    result["cpu_s"] = {name: svc.cpu_s() - before[name] for name, svc in watch.items()}
    result["peak_rss_mib"] = {name: svc.peak_rss_mib() for name, svc in watch.items()}
    result["warmup"] = ready.get("warmup", {})
    return result


def summarise(sc: Scenario, raw: dict[str, Any]) -> dict[str, Any]:
    lat = raw["latency_ms"]
    n = len(lat)

    def per_req(seconds: float) -> float | None:
        return seconds * 1000 / n if n else None

    out = {
        "n": n, "wall_s": raw["wall_s"], "rps": n / raw["wall_s"] if raw["wall_s"] else None,
        "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "mean_ms": statistics.fmean(lat) if n else None,
        "ttfb_p50_ms": pct(raw["ttfb_ms"], 0.5), "ttfb_p99_ms": pct(raw["ttfb_ms"], 0.99),
        "client_cpu_ms": per_req(raw["client_cpu_s"]),
        "upstream_cpu_ms": per_req(raw["cpu_s"].get("upstream", 0.0)),
        "proxy_cpu_ms": per_req(raw["cpu_s"]["proxy"]) if "proxy" in raw["cpu_s"] else None,
        "proxy_peak_rss_mib": raw["peak_rss_mib"].get("proxy"),
        "status": raw["status"], "semcache": raw["semcache"], "errors": raw["errors"],
        "hit_share": raw["semcache"].get(sc.expect, 0) / n if n else None,
    }
    if raw["similarity"]:
        out["similarity_p50"] = pct(raw["similarity"], 0.5)
        out["similarity_min"] = min(raw["similarity"])
    return out


# -- the bench ------------------------------------------------------------------------------------

@dataclass
class Bench:
    sizes: Sizes
    tmp: Path
    words: list[str]
    pairs: list[dict[str, Any]]
    upstream: Service | None = None
    proxies: dict[str, Service] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    prompts: Prompts | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        up_port = free_port()
        self.upstream = start_upstream(self.tmp, up_port)
        self.urls["direct"] = f"http://127.0.0.1:{up_port}"
        for target, template in (("off", "cache_off.yaml"), ("on", "cache_on.yaml")):
            config = yaml.safe_load((HERE / "configs" / template).read_text())
            port = free_port()
            config["server"]["port"] = port
            config["backends"][0]["base_url"] = self.urls["direct"]
            path = self.tmp / f"proxy_{target}.yaml"
            path.write_text(yaml.safe_dump(config))
            self.proxies[target] = start_proxy(f"proxy_{target}", path, self.tmp)
            self.urls[target] = f"http://127.0.0.1:{port}"
        for target, svc in self.proxies.items():
            took = svc.wait_ready(self.urls[target] + "/readyz", timeout=600)
            self.notes[f"proxy_{target}_start_s"] = round(took, 1)
            self.notes[f"proxy_{target}_idle_rss_mib"] = round(svc.rss_mib(), 1)
        self.prompts = Prompts(self.words, seed=int(time.time()))

    def stop(self) -> None:
        for svc in self.proxies.values():
            svc.stop()
        if self.upstream is not None:
            self.upstream.stop()

    def watch(self, target: str) -> dict[str, Service]:
        assert self.upstream is not None
        out = {"upstream": self.upstream}
        if target != "direct":
            out["proxy"] = self.proxies[target]
        return out

    # seeding ----------------------------------------------------------------------------------

    def _entries(self) -> int:
        return int(get_json(self.urls["on"] + "/admin/cache/stats")["entries"])

    def _settle_entries(self, timeout: float = 30.0) -> int:
        last, stable_since, started = -1, time.monotonic(), time.monotonic()
        while time.monotonic() - started < timeout:
            now = self._entries()
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since > 0.5:
                break
            time.sleep(0.1)
        return last

    def seed_semantic(self, tenant: str, count: int) -> None:
        """Store ``count`` original questions under ``tenant`` (misses through the proxy).

        A semantic lookup that times out is served as a miss, and that answer is then stored
        under the paraphrase's own exact key: the next time the same paraphrase comes it is an
        exact hit. Runs at c=32 can do that, so each gets a freshly seeded tenant.
        """
        seeds = self.pairs[:count]
        before = self._entries()
        spec = self._spec("on", 32, [chat_body(p["q"]) for p in seeds], [], len(seeds), 300,
                          tenant=tenant)
        started = time.monotonic()
        raw = run_load(spec, {}, self.tmp)
        stored = self._settle_entries() - before
        self.notes.setdefault("semantic_seeded", {})[tenant] = {
            "sent": len(seeds), "stored": stored, "answers": raw["semcache"], "errors": raw["errors"],
            "seconds": round(time.monotonic() - started, 1)}

    def seed_exact(self, tenant: str, body: str) -> None:
        url = self.urls["on"] + CHAT
        headers = {"Authorization": f"Bearer {tenant}"}
        for _ in range(100):
            status, got, _ = http_post(url, body.encode(), headers)
            if status == 200 and got.get("x-semcache") == "exact":
                return
            time.sleep(0.05)
        raise RuntimeError("exact-hit seed never came back as an exact hit")

    # runs -------------------------------------------------------------------------------------

    def _spec(self, target: str, c: int, bodies: list[str], warmup: list[str], requests: int,
              max_seconds: float, *, tenant: str, stream: bool = False) -> dict[str, Any]:
        return {"url": self.urls[target] + CHAT, "bodies": bodies, "warmup": warmup, "concurrency": c,
                "requests": requests, "max_seconds": max_seconds, "stream": stream,
                "headers": {"Authorization": f"Bearer {tenant}"}}

    def bodies(self, sc: Scenario, rep: int) -> tuple[list[str], list[str], str]:
        assert self.prompts is not None
        n = self.sizes.requests(sc)
        n_warm = 16 if sc.c == 1 else 2 * sc.c
        if sc.kind == "unique":
            tenant = f"bench-{sc.key}-c{sc.c}-r{rep}"
            return ([chat_body(t, sc.stream) for t in self.prompts.take(n)],
                    [chat_body(t, sc.stream) for t in self.prompts.take(n_warm)], tenant)
        if sc.kind in ("exact", "exact-long"):
            tenant = f"bench-{sc.kind}-r{rep}"
            prompt = f"What is the capital of France? (benchmark repetition {rep})"
            if sc.kind == "exact-long":
                # a realistic pasted-document prompt: ~4 KB, past the embedder's window
                prompt = (prompt + " " + " ".join(self.prompts.take(60)))[:4096]
            body = chat_body(prompt, sc.stream)
            self.seed_exact(tenant, chat_body(prompt))
            return [body], [body] * n_warm, tenant
        if sc.c == 1:
            tenant, count = "bench-semantic", self.sizes.seeds
        else:
            tenant, count = f"bench-semantic-c{sc.c}-r{rep}", self.sizes.seeds32
            self.seed_semantic(tenant, count)
        paraphrases = [chat_body(p["p"], sc.stream) for p in self.pairs[:count]]
        return paraphrases, paraphrases[-n_warm:], tenant

    def run(self, sc: Scenario, rep: int) -> dict[str, Any]:
        bodies, warmup, tenant = self.bodies(sc, rep)
        spec = self._spec(sc.target, sc.c, bodies, warmup, self.sizes.requests(sc),
                          self.sizes.max_seconds, tenant=tenant, stream=sc.stream)
        # every process idle first: a backlog left in any of them would steal this run's CPU
        services = [*self.proxies.values(), *([self.upstream] if self.upstream else [])]
        settle = max((svc.wait_idle() for svc in services), default=0.0)
        before: dict[str, float] = {}

        def on_ready() -> None:
            if sc.target == "on":
                before.update(metrics_sample(self.urls["on"], EMBED_METRICS))

        raw = run_load(spec, self.watch(sc.target), self.tmp, on_ready)
        row = summarise(sc, raw)
        row["settle_s"] = round(settle, 1)
        if before:
            after = metrics_sample(self.urls["on"], EMBED_METRICS)
            delta = {k: after[k] - before[k] for k in EMBED_METRICS}
            calls = delta["semcache_embedding_batch_size_count"]
            texts = delta["semcache_embedding_batch_size_sum"]
            row["embed_batch_mean"] = texts / calls if calls else None
            row["cache_errors"] = delta["semcache_cache_errors_total"]
        return row

    def profile(self, out_dir: Path) -> dict[str, Any]:
        """Extra runs (not in the tables) with py-spy sampling the proxy; top frames per path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        pyspy = Path(sys.executable).parent / "py-spy"
        if not pyspy.exists():
            raise RuntimeError(f"{pyspy} not found: pip install py-spy into this environment")
        found: dict[str, Any] = {}
        for sc in PROFILED:
            bodies, warmup, tenant = self.bodies(sc, 99)
            spec = self._spec(sc.target, sc.c, bodies, warmup, 3 * self.sizes.requests(sc),
                              self.sizes.max_seconds, tenant=tenant, stream=sc.stream)
            name = f"{sc.key}-c{sc.c}"
            raw_path = out_dir / f"{name}.collapsed.txt"
            svg_path = out_dir / f"{name}.svg"
            spies: list[subprocess.Popen[bytes]] = []

            def on_ready(target: str = sc.target, raw_path: Path = raw_path, svg_path: Path = svg_path,
                         spies: list[subprocess.Popen[bytes]] = spies) -> None:
                pid = str(self.proxies[target].pid)
                for fmt, path in (("raw", raw_path), ("flamegraph", svg_path)):
                    spies.append(subprocess.Popen(
                        [str(pyspy), "record", "--pid", pid, "--rate", "200", "--nonblocking",
                         "--format", fmt, "--output", str(path)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                time.sleep(1.0)

            run_load(spec, {}, self.tmp, on_ready)
            for spy in spies:
                spy.send_signal(2)
                spy.wait(30)
            found[name] = top_frames(raw_path)
            found[name]["svg"] = str(svg_path)
        return found


PROFILED = (
    Scenario("exact-hit", "", "on", 32, kind="exact", expect="exact"),
    Scenario("semantic-hit", "", "on", 32, kind="paraphrase", expect="semantic"),
    Scenario("semantic-hit", "", "on", 1, kind="paraphrase", expect="semantic"),
    Scenario("off-miss", "", "off", 32, expect="bypass"),
    Scenario("off-miss", "", "off", 1, expect="bypass"),
    Scenario("on-miss", "", "on", 1, expect="miss"),
    Scenario("off-stream", "", "off", 1, stream=True, expect="bypass"),
)


def top_frames(path: Path, n: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return {"samples": 0, "self": [], "inclusive": []}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f.replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "") for f in frames]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(frame, round(100 * c / total, 1)) for frame, c in counter.most_common(n)]

    return {"samples": total, "self": share(own), "inclusive": share(incl)}


# -- report ---------------------------------------------------------------------------------------

def median(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def aggregate(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over repetitions; ratios against the direct run of the same repetition."""
    table: dict[str, dict[str, Any]] = {}
    for name, rows in results.items():
        sc_key, c, stream = name.split("|")
        direct_name = f"{'direct-stream' if stream == 'True' else 'direct'}|{c}|{stream}"
        directs = results.get(direct_name, [])
        agg: dict[str, Any] = {"reps": len(rows)}
        for metric in ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms", "proxy_cpu_ms",
                       "upstream_cpu_ms", "client_cpu_ms", "proxy_peak_rss_mib", "hit_share",
                       "embed_batch_mean", "cache_errors", "similarity_p50"):
            agg[metric] = median([r.get(metric) for r in rows])
        agg["p50_range"] = (min(r["p50_ms"] for r in rows), max(r["p50_ms"] for r in rows))
        agg["errors"] = sum(sum(r["errors"].values()) for r in rows)
        settles = [r["settle_s"] for r in rows if "settle_s" in r]
        agg["settle_max_s"] = max(settles) if settles else None
        agg["cache_errors_total"] = sum(r.get("cache_errors") or 0 for r in rows)
        agg["answers"] = dict(sum((Counter(r["semcache"]) for r in rows), Counter()))
        agg["non_200"] = sum(v for r in rows for k, v in r["status"].items() if k != "200")
        if directs and sc_key not in ("direct", "direct-stream"):
            pairs = list(zip(rows, directs, strict=False))
            agg["direct_rps"] = median([d["rps"] for _, d in pairs])
            agg["direct_p50_ms"] = median([d["p50_ms"] for _, d in pairs])
            agg["direct_p99_ms"] = median([d["p99_ms"] for _, d in pairs])
            agg["direct_ttfb_p50_ms"] = median([d["ttfb_p50_ms"] for _, d in pairs])
            agg["rps_ratio"] = median([r["rps"] / d["rps"] for r, d in pairs])
            agg["p50_added_ms"] = median([r["p50_ms"] - d["p50_ms"] for r, d in pairs])
            agg["p50_ratio"] = median([r["p50_ms"] / d["p50_ms"] for r, d in pairs])
            if stream == "True":
                agg["ttfb_added_ms"] = median([r["ttfb_p50_ms"] - d["ttfb_p50_ms"] for r, d in pairs])
        goal = GOALS.get((sc_key, int(c)))
        if goal is not None:
            agg["goal"] = goal.text
            agg["goal_met"] = goal.met(agg.get(goal.metric))
        table[name] = agg
    return table


def markdown(table: dict[str, dict[str, Any]], labels: dict[str, str], machine: dict[str, Any],
             notes: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Machine: {machine['cpu']}, nproc {machine['nproc']}, Python {machine['python']}, "
             f"aiohttp {machine['aiohttp']}, load average at start {machine['loadavg']}, "
             f"at end {machine.get('loadavg_end', '?')}", "",
             f"Proxy code: {machine['code']}", ""]
    lines += ["### Non-streaming (medians over repetitions; ratios vs direct in the same repetition)", "",
              "| scenario | c | req/s | p50 ms | p99 ms | proxy CPU ms/req | proxy peak RSS MiB "
              "| direct req/s | direct p50 ms | direct p99 ms | added p50 ms | req/s vs direct "
              "| share as expected | goal | met |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, agg in table.items():
        if name.endswith("True"):
            continue
        _, c, _ = name.split("|")
        met = {True: "yes", False: "**no**", None: ""}[agg.get("goal_met")]
        lines.append(
            f"| {labels[name]} | {c} | {fmt(agg['rps'], 0)} | {fmt(agg['p50_ms'])} | {fmt(agg['p99_ms'])} "
            f"| {fmt(agg['proxy_cpu_ms'])} | {fmt(agg['proxy_peak_rss_mib'], 0)} "
            f"| {fmt(agg.get('direct_rps'), 0)} | {fmt(agg.get('direct_p50_ms'))} "
            f"| {fmt(agg.get('direct_p99_ms'))} | {fmt(agg.get('p50_added_ms'))} "
            f"| {fmt(agg.get('rps_ratio'))} "
            f"| {fmt(100 * agg['hit_share'] if agg['hit_share'] is not None else None, 1)}% "
            f"| {agg.get('goal', '')} | {met} |")
    lines += ["", "### Streaming, c=1 (time to first byte = first body chunk)", "",
              "| scenario | req/s | TTFB p50 ms | TTFB p99 ms | total p50 ms | proxy CPU ms/req "
              "| direct TTFB p50 ms | added TTFB p50 ms | share as expected |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, agg in table.items():
        if not name.endswith("True"):
            continue
        lines.append(
            f"| {labels[name]} | {fmt(agg['rps'], 0)} | {fmt(agg['ttfb_p50_ms'])} "
            f"| {fmt(agg['ttfb_p99_ms'])} "
            f"| {fmt(agg['p50_ms'])} | {fmt(agg['proxy_cpu_ms'])} | {fmt(agg.get('direct_ttfb_p50_ms'))} "
            f"| {fmt(agg.get('ttfb_added_ms'))} "
            f"| {fmt(100 * agg['hit_share'] if agg['hit_share'] is not None else None, 1)}% |")
    lines += ["", "### CPU per request of every process (ms, medians)", "",
              "| scenario | c | proxy | upstream | client | p50 range over reps (ms) | errors | non-200 "
              "| longest wait for idle before a run (s) |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, agg in table.items():
        _, c, _ = name.split("|")
        low, high = agg["p50_range"]
        lines.append(f"| {labels[name]} | {c} | {fmt(agg['proxy_cpu_ms'])} | {fmt(agg['upstream_cpu_ms'])} "
                     f"| {fmt(agg['client_cpu_ms'])} | {low:.2f}-{high:.2f} | {agg['errors']} "
                     f"| {agg['non_200']} | {fmt(agg['settle_max_s'], 1)} |")
    lines += ["", "### Cache-on runs: answers by x-semcache, embedding batches, lookup faults", "",
              "| scenario | c | x-semcache answers (all reps) | mean embedding batch "
              "| lookup faults, all reps (timeouts -> miss) | median similarity |",
              "|---|---:|---|---:|---:|---:|"]
    for name, agg in table.items():
        if agg.get("embed_batch_mean") is None and agg.get("cache_errors") is None:
            continue
        _, c, _ = name.split("|")
        answers = ", ".join(f"{k} {v}" for k, v in sorted(agg["answers"].items()))
        lines.append(f"| {labels[name]} | {c} | {answers} | {fmt(agg['embed_batch_mean'], 1)} "
                     f"| {agg['cache_errors_total']:.0f} | {fmt(agg['similarity_p50'], 4)} |")
    seeded = notes.get("semantic_seeded", {})
    lines += ["", f"Start-up: cache-off proxy ready in {notes.get('proxy_off_start_s')} s at "
              f"{notes.get('proxy_off_idle_rss_mib')} MiB RSS; cache-on proxy (model loaded) in "
              f"{notes.get('proxy_on_start_s')} s at {notes.get('proxy_on_idle_rss_mib')} MiB RSS. "
              + "".join(f"Semantic seeding {tenant}: {v['stored']} of {v['sent']} questions stored "
                        f"in {v['seconds']} s. " for tenant, v in seeded.items())
              + f"Whole run {notes.get('elapsed_s')} s."]
    return "\n".join(lines)


def code_version() -> str:
    """HEAD, plus a hash of the proxy sources when they differ from it (others edit proxy/)."""
    import hashlib

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "proxy")
    if not dirty:
        return head
    digest = hashlib.sha256()
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        digest.update(path.read_bytes())
    return f"{head} + uncommitted proxy/ changes (sources sha256 {digest.hexdigest()[:12]})"


def print_profile(profile: dict[str, Any]) -> None:
    for key, found in profile.items():
        print(f"\n### py-spy: {key} ({found['samples']} samples, flamegraph {found['svg']})\n")
        print("| self % | function | | inclusive % | function |\n|---:|---|---|---:|---|")
        for (f1, s1), (f2, s2) in zip(found["self"], found["inclusive"], strict=False):
            print(f"| {s1} | `{f1}` | | {s2} | `{f2}` |")


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp
    return {"cpu": cpu, "code": code_version(), "nproc": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "aiohttp": aiohttp.__version__, "kernel": platform.release(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description="direct vs proxy benchmark (loopback, fake upstream)")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions (~2 min)")
    parser.add_argument("--reps", type=int, help="repetitions of every scenario")
    parser.add_argument("--only", help="comma-separated scenario keys (direct runs are always kept)")
    parser.add_argument("--json", type=Path, help="where to write the figures "
                        "(default bench/results/bench-<time>.json)")
    parser.add_argument("--profile", type=Path, help="also profile the hit paths with py-spy into DIR")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the 1-minute load average to drop "
                        "below 1.0 (a shared machine)")
    parser.add_argument("--report", type=Path, help="only render the tables of a saved JSON file")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        labels = {f"{sc.key}|{sc.c}|{sc.stream}": sc.label for sc in scenarios()}
        print(markdown(aggregate(saved["runs"]), labels, saved["machine"], saved["notes"], saved["command"]))
        print_profile(saved.get("profile") or {})
        return
    sizes = QUICK if args.quick else FULL
    if args.reps:
        sizes.reps = args.reps
    if args.profile and not (Path(sys.executable).parent / "py-spy").exists():
        sys.exit("--profile needs py-spy in this environment: pip install py-spy")
    pairs = load_pairs()
    if len(pairs) < max(sizes.seeds, sizes.seeds32):
        sys.exit(f"{PAIRS} holds {len(pairs)} usable pairs, {sizes.seeds} needed")
    chosen = scenarios()
    if args.only:
        keep = set(args.only.split(",")) | {"direct", "direct-stream"}
        chosen = [sc for sc in chosen if sc.key in keep]
    command = "python -m bench.run_bench " + " ".join(sys.argv[1:])
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    machine = machine_info()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="semcache-bench-") as tmp_name:
        bench = Bench(sizes=sizes, tmp=Path(tmp_name), words=vocabulary(pairs), pairs=pairs)
        results: dict[str, list[dict[str, Any]]] = {}
        labels = {f"{sc.key}|{sc.c}|{sc.stream}": sc.label for sc in chosen}
        profile: dict[str, Any] = {}
        try:
            bench.start()
            if any(sc.kind == "paraphrase" and sc.c == 1 for sc in chosen):
                bench.seed_semantic("bench-semantic", sizes.seeds)
            for rep in range(sizes.reps):
                for sc in chosen:
                    row = bench.run(sc, rep)
                    results.setdefault(f"{sc.key}|{sc.c}|{sc.stream}", []).append(row)
                    print(f"[rep {rep + 1}/{sizes.reps}] {sc.key:20} c={sc.c:<3} "
                          f"{fmt(row['rps'], 0):>6} req/s p50 {fmt(row['p50_ms']):>6} ms "
                          f"proxy {fmt(row['proxy_cpu_ms'])} ms/req as-expected "
                          f"{fmt(100 * row['hit_share'], 1)}%", file=sys.stderr, flush=True)
            if args.profile:
                profile = bench.profile(args.profile)
        finally:
            bench.stop()
    bench.notes["elapsed_s"] = round(time.monotonic() - started, 1)
    machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if not results:
        sys.exit("no scenario finished")
    table = aggregate(results)
    print(markdown(table, labels, machine, bench.notes, command))
    print_profile(profile)
    out = args.json or ROOT / "bench" / "results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": machine, "sizes": sizes.__dict__,
                               "notes": bench.notes, "table": table, "runs": results,
                               "profile": profile}, indent=1, default=str))
    print(f"\nfigures written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
