"""Closed-loop HTTP load generator for the benchmark, run as its own process.

    python -m bench.loadgen SPEC.json            # SPEC written by bench.run_bench

The spec names the URL, headers, the request bodies (sent in order, cycling when there are fewer
bodies than requests), warm-up bodies, the concurrency ``c`` and the bounds (``requests`` and
``max_seconds``: whichever comes first ends the run). One ``aiohttp.ClientSession`` with a
connection pool of exactly ``c`` keep-alive connections; ``c`` workers each send the next request
as soon as their previous answer is read completely.

Handshake on stdin/stdout, so the caller can read other processes' CPU counters right around the
measured part: after the warm-up it prints ``{"ready": true}``, waits for one line on stdin, runs,
and prints one JSON line with the per-request latencies (ms), time to first body byte (ms, for
streams), time to first token (ms: the first SSE event whose ``choices[0].delta`` carries content,
not just the first byte: a relay can send headers or a role-only chunk early), status and
``x-semcache`` counts, wall time and its own CPU time.

``urls`` (a list) instead of ``url`` spreads the requests round-robin over several servers (the
replica benchmark: two proxy processes sharing one Redis, no load balancer in between).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

DONE = b"data: [DONE]\n\n"


@dataclass
class Spec:
    bodies: list[str]
    concurrency: int
    requests: int
    max_seconds: float
    warmup: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    handshake: bool = True
    url: str = ""
    urls: list[str] = field(default_factory=list)
    # the header counted per answer; a peer has no x-semcache. With ``count_presence`` the value
    # does not matter (a cache key, say): present counts as "exact", absent as "miss"
    count_header: str = "x-semcache"
    count_presence: bool = False

    def targets(self) -> list[str]:
        return self.urls or [self.url]

    @classmethod
    def load(cls, path: str) -> Spec:
        with open(path, encoding="utf-8") as handle:
            return cls(**json.load(handle))


@dataclass
class Tally:
    latency_ms: list[float] = field(default_factory=list)
    ttfb_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    status: Counter[str] = field(default_factory=Counter)
    semcache: Counter[str] = field(default_factory=Counter)
    similarity: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def has_content(events: bytes) -> bool:
    """Whether any complete SSE event in ``events`` carries a content (or reasoning) delta."""
    for event in events.split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:") or line[5:].strip() in (b"", b"[DONE]"):
                continue
            try:
                delta = json.loads(line[5:])["choices"][0].get("delta") or {}
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                continue
            if delta.get("content") or delta.get("reasoning_content"):
                return True
    return False


async def one(session: aiohttp.ClientSession, url: str, spec: Spec, body: bytes, tally: Tally) -> None:
    started = time.perf_counter()
    first: float | None = None
    token: float | None = None
    try:
        async with session.post(url, data=body, headers=spec.headers) as resp:
            if spec.stream:
                tail = b""
                pending = b""  # events not yet looked at, only until the first token is seen
                async for chunk in resp.content.iter_any():
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    if token is None:
                        pending += chunk
                        cut = pending.rfind(b"\n\n")
                        if cut >= 0:
                            if has_content(pending[:cut]):
                                token = now
                            pending = pending[cut + 2:]
                    tail = (tail + chunk)[-len(DONE):]
                complete = tail == DONE
            else:
                await resp.read()
                complete = True
            status, result = resp.status, resp.headers.get(spec.count_header, "none")
            if spec.count_presence:
                result = "miss" if result == "none" else "exact"
            similarity = resp.headers.get("x-semcache-similarity")
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        tally.errors[type(exc).__name__] += 1
        return
    ended = time.perf_counter()
    tally.latency_ms.append((ended - started) * 1000)
    if first is not None:
        tally.ttfb_ms.append((first - started) * 1000)
    if token is not None:
        tally.ttft_ms.append((token - started) * 1000)
    tally.status[str(status)] += 1
    tally.semcache[result] += 1
    if similarity is not None:
        tally.similarity.append(float(similarity))
    if not complete:
        tally.errors["stream_without_done"] += 1


async def drive(session: aiohttp.ClientSession, spec: Spec, bodies: list[bytes], count: int,
                max_seconds: float, tally: Tally) -> float:
    if not bodies or count <= 0:
        return 0.0
    next_index = 0
    targets = spec.targets()
    started = time.perf_counter()
    deadline = started + max_seconds

    async def worker() -> None:
        nonlocal next_index
        while next_index < count and time.perf_counter() < deadline:
            body = bodies[next_index % len(bodies)]
            url = targets[next_index % len(targets)]
            next_index += 1
            await one(session, url, spec, body, tally)

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    return time.perf_counter() - started


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(spec: Spec) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=spec.concurrency,
                                     force_close=False, enable_cleanup_closed=False)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                     skip_auto_headers=("User-Agent",)) as session:
        warm = Tally()
        warmup = [b.encode() for b in spec.warmup]
        await drive(session, spec, warmup, len(warmup), 60.0, warm)
        if spec.handshake:
            print(json.dumps({"ready": True, "warmup": dict(warm.semcache),
                              "warmup_errors": dict(warm.errors)}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        tally = Tally()
        bodies = [b.encode() for b in spec.bodies]
        cpu = _cpu_s()
        wall = await drive(session, spec, bodies, spec.requests, spec.max_seconds, tally)
        cpu = _cpu_s() - cpu
    return {"wall_s": wall, "client_cpu_s": cpu, "latency_ms": tally.latency_ms,
            "ttfb_ms": tally.ttfb_ms, "ttft_ms": tally.ttft_ms, "status": dict(tally.status),
            "semcache": dict(tally.semcache),
            "similarity": tally.similarity, "errors": dict(tally.errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description="closed-loop load generator (bench.run_bench drives it)")
    parser.add_argument("spec", help="JSON file with the run's spec")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default loop")
    args = parser.parse_args()
    spec = Spec.load(args.spec)
    result: dict[str, Any]
    try:
        if args.no_uvloop:
            raise ImportError
        import uvloop
        result = uvloop.run(run(spec))
    except ImportError:
        result = asyncio.run(run(spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
