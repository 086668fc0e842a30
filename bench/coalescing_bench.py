"""Upstream calls per 1000 requests when 30% of them are duplicates arriving concurrently.

    OMP_NUM_THREADS=1 python -m bench.coalescing_bench                 # ~30 s
    OMP_NUM_THREADS=1 python -m bench.coalescing_bench --semantic      # + the embedder (slower start)

The real proxy runs as a subprocess (``python -m proxy serve``) in front of the fake upstream,
which runs in a thread of this process with ``--latency-ms`` before its headers (200 ms by
default), so the calls it receives are counted where they arrive. The workload has ``--requests``
requests of which ``--dup-share`` are copies of an earlier request placed at most
``--window`` positions after it; with ``--concurrency`` workers in a closed loop (each sends the
next request as soon as its answer is read) and window < concurrency, a copy is sent while its
original is still in flight. ``--stream-share`` of the requests stream (the exact key ignores
``stream``, so streaming and JSON copies share calls too).

Each workload runs twice through separate proxies: cache (and so single-flight) off, which is
what calls cost without coalescing, and the configured cache on. Reported: upstream calls per 1000
requests, extra calls = calls - distinct prompts (the goal is 0: no duplicate ever reaches the
upstream twice), how the proxy answered (x-semcache), and p50/p99 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import yaml
from aiohttp import web

from bench.fake_upstream import FakeUpstream
from bench.procs import Service, free_port, start_proxy

T = TypeVar("T")
MODEL = "deepseek-chat"
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Request:
    prompt: str
    stream: bool


def workload(n: int, dup_share: float, window: int, stream_share: float, seed: int) -> list[Request]:
    """``n`` requests; ``round(n * dup_share)`` of them repeat an earlier prompt from at most
    ``window`` positions before them."""
    rng = random.Random(seed)
    tag = f"{seed}-{time.time_ns()}"     # a fresh cache every run
    dups = round(n * dup_share)
    slots: list[str | None] = [None] * n
    # choose the positions of the copies: never the first, and with an original before them
    positions = sorted(rng.sample(range(1, n), dups))
    dup_at = set(positions)
    unique = 0
    for i in range(n):
        if i not in dup_at:
            slots[i] = f"Question {unique} ({tag}): what is {unique} squared, in words?"
            unique += 1
    for i in positions:
        earlier = [slots[j] for j in range(max(0, i - window), i) if slots[j] is not None]
        if not earlier:
            earlier = [next(s for s in slots if s is not None)]
        slots[i] = rng.choice(earlier)
    return [Request(str(prompt), rng.random() < stream_share) for prompt in slots]


class UpstreamThread:
    """The fake upstream on its own event loop in a thread, so its call count can be read here."""

    def __init__(self, latency_s: float) -> None:
        self.fake = FakeUpstream(latency_s=latency_s, keep_requests=False)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="upstream", daemon=True)
        self.thread.start()
        self.port = free_port()
        self.runner = web.AppRunner(self.fake.app(), access_log=None)
        self._run(self.runner.setup())
        self._run(web.TCPSite(self.runner, "127.0.0.1", self.port).start())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def proxy_config(port: int, upstream_url: str, *, cache: bool, semantic: bool) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "admin_token_env": None, "max_in_flight": 4096,
                   "log_level": "WARNING"},
        "backends": [{"name": "fake", "type": "openai", "base_url": upstream_url, "api_key_env": None,
                      "models": ["*"], "max_concurrency": 256}],
        "cache": {"enabled": cache, "semantic": semantic, "coalesce": True,
                  "max_entries": 1_000_000, "max_bytes": 2**31},
        "embedding": {"cache_dir": "data/models", "threads": 1},
        "store": {"type": "memory", "data_dir": ""},
    }


async def one(session: aiohttp.ClientSession, url: str, req: Request) -> tuple[int, str, float]:
    body = orjson.dumps({"model": MODEL, "stream": req.stream,
                         "messages": [{"role": "user", "content": req.prompt}]})
    started = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=body,
                            headers={"Content-Type": "application/json"}) as resp:
        data = await resp.read()
        state = resp.headers.get("x-semcache", "-")
        ok = resp.status == 200 and (not req.stream or data.rstrip().endswith(b"data: [DONE]"))
    return (resp.status if ok else -resp.status), state, time.perf_counter() - started


async def drive(url: str, requests: list[Request], concurrency: int) -> list[tuple[int, str, float]]:
    results: list[tuple[int, str, float]] = [(0, "", 0.0)] * len(requests)
    cursor = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal cursor
        while cursor < len(requests):
            index = cursor
            cursor += 1
            results[index] = await one(session, url, requests[index])

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results


def run_case(name: str, upstream: UpstreamThread, requests: list[Request], args: argparse.Namespace,
             log_dir: Path, *, cache: bool) -> dict[str, Any]:
    port = free_port()
    config_path = log_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(proxy_config(port, upstream.url, cache=cache,
                                                       semantic=cache and args.semantic)))
    proxy: Service = start_proxy(name, config_path, log_dir)
    try:
        proxy.wait_ready(f"http://127.0.0.1:{port}/readyz", timeout=300)
        before = upstream.fake.calls
        started = time.perf_counter()
        results = asyncio.run(drive(f"http://127.0.0.1:{port}", requests, args.concurrency))
        wall = time.perf_counter() - started
        calls = upstream.fake.calls - before
    finally:
        proxy.stop()
    distinct = len({r.prompt for r in requests})
    latencies = sorted(seconds for _, _, seconds in results)
    failed = sum(1 for status, _, _ in results if status != 200)
    return {
        "case": name, "requests": len(requests), "distinct_prompts": distinct, "upstream_calls": calls,
        "calls_per_1000": round(calls * 1000 / len(requests), 1),
        "extra_calls": calls - distinct if cache else None,
        "failed": failed, "answered": dict(Counter(state for _, state, _ in results)),
        "wall_s": round(wall, 2),
        "p50_ms": round(statistics.median(latencies) * 1000, 1),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--dup-share", type=float, default=0.3)
    parser.add_argument("--window", type=int, default=20, help="a copy follows its original within this")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument("--semantic", action="store_true",
                        help="cache with the embedder (exact only otherwise)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.window >= args.concurrency:
        print("note: window >= concurrency, so some copies may arrive after their original ended",
              file=sys.stderr)

    upstream = UpstreamThread(args.latency_ms / 1000)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="coalescing-") as tmp:
            for name, cache in (("cache_off", False), ("coalescing", True)):
                requests = workload(args.requests, args.dup_share, args.window, args.stream_share, args.seed)
                rows.append(run_case(name, upstream, requests, args, Path(tmp), cache=cache))
    finally:
        upstream.stop()

    print(f"\n{args.requests} requests, {args.dup_share:.0%} duplicates within {args.window} positions, "
          f"concurrency {args.concurrency}, upstream latency {args.latency_ms:.0f} ms, "
          f"{args.stream_share:.0%} streaming, cache {'exact+semantic' if args.semantic else 'exact'}\n")
    print("| proxy | distinct prompts | upstream calls | calls / 1000 req | extra calls for duplicates "
          "| answered (x-semcache) | failed | p50 ms | p99 ms | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        answered = ", ".join(f"{k} {v}" for k, v in sorted(row["answered"].items()))
        extra = "-" if row["extra_calls"] is None else row["extra_calls"]
        print(f"| {row['case']} | {row['distinct_prompts']} | {row['upstream_calls']} | "
              f"{row['calls_per_1000']} | {extra} | {answered} | {row['failed']} | {row['p50_ms']} | "
              f"{row['p99_ms']} | {row['wall_s']} |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"coalescing-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"\nfull figures: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
