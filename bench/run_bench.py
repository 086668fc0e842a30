"""Direct vs proxy (vs LiteLLM's proxy) on loopback: miss, exact-hit, semantic-hit and streaming paths.

    OMP_NUM_THREADS=1 python -m bench.run_bench --quick                  # make bench (durations:
    OMP_NUM_THREADS=1 python -m bench.run_bench --peer litellm           #   docs/benchmarks.md)
    OMP_NUM_THREADS=1 python -m bench.run_bench --profile /tmp/prof      # + py-spy profiles of the hit paths

Starts the fake upstream (0 ms latency) and two proxies (``bench/configs/cache_off.yaml`` and
``cache_on.yaml``) as subprocesses on free loopback ports, and with ``--peer litellm`` two LiteLLM
proxies (caching off; its local cache) from their own virtualenv (``bench/peer_litellm.py``), then
runs every scenario ``--reps`` times, each run in a fresh ``bench.loadgen`` process, at c=1 and
c=32, plain and streamed. Per run it records req/s, p50, p99 (and for streams time to first byte
and to the first content delta), the CPU time per request of the proxy (LiteLLM: its process
tree), the upstream and the client (from /proc utime+stime around the measured part only) and the
proxy's peak RSS. Direct runs (client -> upstream) are made in every repetition, so each proxy
figure has a direct figure (and a peer figure) from the same moment; the tables
(``bench/bench_report.py``) show medians over the repetitions, ratios are medians of per-run ratios.
Markdown goes to stdout, the full figures to ``bench/results/bench-<time>.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
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

from bench import peer_litellm
from bench.bench_report import aggregate, fmt, machine_info, markdown, print_profile
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
# LiteLLM says nothing like x-semcache; its answers from the cache carry their cache key
PEER_HIT_HEADER = "x-litellm-cache-key"
SEED_CONCURRENCY = 4


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    target: str            # direct | off | on | peer-off | peer-on
    c: int
    stream: bool = False
    kind: str = "unique"   # unique | exact | exact-long | paraphrase
    expect: str = "none"   # the x-semcache value every answer should carry


def scenarios(peer: bool = False) -> list[Scenario]:
    """Every path at c=1 and c=32, plain and streamed; the peer's runs when ``peer``."""
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
        if peer:
            out += [
                Scenario("peer-off-miss", "LiteLLM, cache off (miss)", "peer-off", c, expect="miss"),
                Scenario("peer-on-miss", "LiteLLM, local cache on, unique (miss)", "peer-on", c,
                         expect="miss"),
                Scenario("peer-exact-hit", "LiteLLM, local cache, exact hit", "peer-on", c, kind="exact",
                         expect="exact"),
            ]
    for c in (1, 32):
        out += [
            Scenario("direct-stream", "direct, streamed", "direct", c, stream=True),
            Scenario("off-stream", "proxy, cache off, streamed miss", "off", c, stream=True,
                     expect="bypass"),
            Scenario("on-stream-miss", "proxy, cache on, streamed miss", "on", c, stream=True,
                     expect="miss"),
            Scenario("exact-stream-hit", "proxy, streamed exact hit", "on", c, stream=True,
                     kind="exact", expect="exact"),
            Scenario("semantic-stream-hit", "proxy, streamed semantic hit", "on", c, stream=True,
                     kind="paraphrase", expect="semantic"),
        ]
        if peer:
            out += [
                Scenario("peer-off-stream", "LiteLLM, cache off, streamed miss", "peer-off", c,
                         stream=True, expect="miss"),
                Scenario("peer-exact-stream-hit", "LiteLLM, local cache, streamed exact hit", "peer-on", c,
                         stream=True, kind="exact", expect="exact"),
            ]
    return out


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
# 3 repetitions (5 before the peer and the c=32 streams were added) keep the full run near 15 min
FULL = Sizes(reps=3, n1=1000, n32=3000, nstream=400, seeds=1000, seeds32=600, max_seconds=10)


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
        "ttft_p50_ms": pct(raw.get("ttft_ms", []), 0.5), "ttft_p99_ms": pct(raw.get("ttft_ms", []), 0.99),
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
    peer: bool = False
    #: dotted config keys and values laid over cache_on.yaml (``--set``)
    overrides: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        up_port = free_port()
        self.upstream = start_upstream(self.tmp, up_port)
        self.urls["direct"] = f"http://127.0.0.1:{up_port}"
        for target, template in (("off", "cache_off.yaml"), ("on", "cache_on.yaml")):
            config = yaml.safe_load((HERE / "configs" / template).read_text())
            port = free_port()
            config["server"]["port"] = port
            config["backends"][0]["base_url"] = self.urls["direct"]
            if target == "on":
                for key, value in self.overrides.items():
                    set_dotted(config, key, value)
            path = self.tmp / f"proxy_{target}.yaml"
            path.write_text(yaml.safe_dump(config))
            self.proxies[target] = start_proxy(f"proxy_{target}", path, self.tmp)
            self.urls[target] = f"http://127.0.0.1:{port}"
        for target, svc in self.proxies.items():
            took = svc.wait_ready(self.urls[target] + "/readyz", timeout=600)
            self.notes[f"proxy_{target}_start_s"] = round(took, 1)
            self.notes[f"proxy_{target}_idle_rss_mib"] = round(svc.rss_mib(), 1)
        if self.peer:
            for target, cache in (("peer-off", False), ("peer-on", True)):
                name = target.replace("-", "_")
                started = time.monotonic()
                svc, self.urls[target] = peer_litellm.start(name, self.urls["direct"], self.tmp, cache=cache)
                self.proxies[target] = svc
                self.notes[f"{name}_start_s"] = round(time.monotonic() - started, 1)
                self.notes[f"{name}_idle_rss_mib"] = round(svc.rss_mib(), 1)
            self.notes["peer"] = (f"LiteLLM proxy ({peer_litellm.PIN}, own virtualenv, 1 worker): "
                                  "caching off, and its local in-memory cache (exact match)")
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
        # c=4, not 32: a seed whose lookup times out (a loaded machine) is stored exact-only, and
        # its paraphrase could then never be a semantic hit
        spec = self._spec("on", SEED_CONCURRENCY, [chat_body(p["q"]) for p in seeds], [], len(seeds), 300,
                          tenant=tenant)
        started = time.monotonic()
        raw = run_load(spec, {}, self.tmp)
        stored = self._settle_entries() - before
        self.notes.setdefault("semantic_seeded", {})[tenant] = {
            "sent": len(seeds), "stored": stored, "answers": raw["semcache"], "errors": raw["errors"],
            "seconds": round(time.monotonic() - started, 1)}

    def seed_exact(self, target: str, tenant: str, body: str) -> None:
        url = self.urls[target] + CHAT
        headers = {"Authorization": f"Bearer {tenant}"}
        for _ in range(100):
            status, got, _ = http_post(url, body.encode(), headers)
            hit = PEER_HIT_HEADER in got if target.startswith("peer") else got.get("x-semcache") == "exact"
            if status == 200 and hit:
                return
            time.sleep(0.05)
        raise RuntimeError(f"exact-hit seed on {target} never came back as an exact hit")

    # runs -------------------------------------------------------------------------------------

    def _spec(self, target: str, c: int, bodies: list[str], warmup: list[str], requests: int,
              max_seconds: float, *, tenant: str, stream: bool = False) -> dict[str, Any]:
        return {"url": self.urls[target] + CHAT, "bodies": bodies,
                "count_header": PEER_HIT_HEADER if target.startswith("peer") else "x-semcache",
                "count_presence": target.startswith("peer"), "warmup": warmup, "concurrency": c,
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
            self.seed_exact(sc.target, tenant, chat_body(prompt))
            return [body], [body] * n_warm, tenant
        if sc.c == 1:
            tenant, count = "bench-semantic", self.sizes.seeds
        else:
            tenant = f"bench-semantic-c{sc.c}-{'stream' if sc.stream else 'plain'}-r{rep}"
            count = self.sizes.seeds32
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
                for kind, path in (("raw", raw_path), ("flamegraph", svg_path)):
                    spies.append(subprocess.Popen(
                        [str(pyspy), "record", "--pid", pid, "--rate", "200", "--nonblocking",
                         "--format", kind, "--output", str(path)],
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


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["a"]["b"] = value`` for ``key`` "a.b", making the sections on the way."""
    *path, last = key.split(".")
    for part in path:
        config = config.setdefault(part, {})
    config[last] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"--set takes KEY=VALUE (e.g. embedding.workers=2), not {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


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
    parser.add_argument("--peer", choices=("litellm",), help="also run LiteLLM's proxy as the peer "
                        "(its own virtualenv: python -m bench.peer_litellm --install, or make bench-peer)")
    parser.add_argument("--report", type=Path, help="only render the tables of a saved JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the cache-on proxy's config (bench/configs/cache_on.yaml), "
                        "e.g. --set embedding.workers=2; repeatable")
    args = parser.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        labels = {f"{sc.key}|{sc.c}|{sc.stream}": sc.label for sc in scenarios(peer=True)}
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
    peer = args.peer == "litellm"
    if peer and not peer_litellm.available():
        print(f"peer skipped: LiteLLM's proxy is not installed ({peer_litellm.executable()} missing); "
              "create its virtualenv with `make bench-peer` or `python -m bench.peer_litellm --install`",
              file=sys.stderr)
        peer = False
    chosen = scenarios(peer)
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
        bench = Bench(sizes=sizes, tmp=Path(tmp_name), words=vocabulary(pairs), pairs=pairs, peer=peer,
                      overrides=parse_overrides(args.set))
        bench.notes.update({f"set {k}": v for k, v in bench.overrides.items()})
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
