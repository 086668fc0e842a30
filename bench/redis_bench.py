"""Redis store vs in-process store, same run, same machine; and the index rebuild from Redis.

    python -m bench.redis_bench                     # full run (about 5 minutes on 2 cores)
    python -m bench.redis_bench --quick             # smaller samples, 20k entries to rebuild
    python -m bench.redis_bench --rebuild 100000 --out bench/results/redis.json

Per store (``memory``, ``redis``) one proxy process (``python -m proxy serve``) in front of the fake
upstream (0 ms): the originals of bench/data/semantic_pairs.json.gz are asked once (misses, stored),
then ``bench.loadgen`` measures exact hits (the originals again) and semantic hits (their
paraphrases, >= 0.975 under the shipped model) at concurrency 1 (latency) and 16 (throughput).
Then ``--rebuild`` entries (384-d vectors, ~600-byte answers) are written to Redis and rebuilt
twice: in-process (RedisStore.vectors -> FaissIndex, the follower's own code) and by a proxy
process at start-up (from its log line). Prints a markdown table; ``--out`` keeps the raw JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.procs import ROOT, Service, bench_env, free_port, get_json, http_get, start_upstream
from proxy.clock import SystemClock
from proxy.index import FaissIndex
from proxy.ports import Entry
from proxy.replication import FollowSettings, IndexFollower
from proxy.store.redis import RedisSettings, RedisStore
from tests.redis_server import RedisServer

PAIRS = ROOT / "bench" / "data" / "semantic_pairs.json.gz"
MODEL = "deepseek-chat"
AUTH = {"Authorization": "Bearer sk-bench-redis"}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def body(prompt: str) -> str:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64})


def pairs(n: int) -> list[dict[str, Any]]:
    with gzip.open(PAIRS, "rt", encoding="utf-8") as handle:
        found: list[dict[str, Any]] = json.load(handle)["pairs"]
    # originals must be distinct, and no paraphrase may equal an original exactly
    seen: set[str] = set()
    out = []
    for pair in found:
        if pair["kind"] == "case" or pair["q"] in seen or pair["p"] in seen:
            continue
        seen.update((pair["q"], pair["p"]))
        out.append(pair)
    return out[:n]


def proxy_config(store: str, port: int, upstream: str, redis_url: str, namespace: str,
                 models_dir: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "admin_token_env": None, "log_level": "INFO",
                   "max_in_flight": 4096},
        "backends": [{"name": "fake", "base_url": upstream, "api_key_env": None}],
        "embedding": {"cache_dir": models_dir},
        "cache": {"threshold": 0.97, "max_entries": 1_000_000, "max_bytes": 4 << 30},
        "store": ({"type": "memory", "data_dir": ""} if store == "memory" else
                  {"type": "redis", "url": redis_url, "namespace": namespace, "data_dir": "",
                   "startup_sync_timeout_s": 600}),
    }


def loadgen(url: str, bodies: list[str], concurrency: int, requests: int, max_seconds: float,
            tmp: Path, warmup: list[str] | None = None) -> dict[str, Any]:
    spec = {"url": url + "/v1/chat/completions", "bodies": bodies, "concurrency": concurrency,
            "requests": requests, "max_seconds": max_seconds, "warmup": warmup or [], "headers": AUTH,
            "handshake": False}
    path = tmp / f"spec-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-m", "bench.loadgen", str(path)], cwd=ROOT, env=bench_env(),
                          capture_output=True, text=True, timeout=900, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def summary(raw: dict[str, Any]) -> dict[str, Any]:
    lat = raw["latency_ms"]
    return {"requests": len(lat), "req_s": round(len(lat) / raw["wall_s"], 1) if raw["wall_s"] else None,
            "p50_ms": round(pct(lat, 0.5) or 0, 2), "p99_ms": round(pct(lat, 0.99) or 0, 2),
            "semcache": raw["semcache"], "errors": raw["errors"], "status": raw["status"]}


def wait_settled(url: str, timeout: float = 120) -> int:
    """Answers are stored after they are sent: wait until the entry count stops moving."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        try:
            entries = int(get_json(url + "/admin/cache/stats").get("entries", 0))
        except RuntimeError:  # the store did not answer within its budget: ask again
            time.sleep(0.1)
            continue
        if entries != last:
            last, since = entries, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return entries
        time.sleep(0.1)
    return last


def cache_errors(url: str) -> dict[str, float]:
    status, text = http_get(url + "/metrics")
    found: dict[str, float] = {}
    for line in text.decode().splitlines() if status == 200 else []:
        match = re.match(r'semcache_cache_errors_total\{operation="(\w+)"\} ([\d.e+]+)', line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def bench_store(store: str, args: argparse.Namespace, work: list[dict[str, Any]], upstream: str,
                redis: RedisServer, tmp: Path) -> dict[str, Any]:
    port = free_port()
    config = proxy_config(store, port, upstream, redis.url, f"bench-{uuid.uuid4().hex[:6]}", args.models_dir)
    path = tmp / f"{store}.yaml"
    path.write_text(yaml.safe_dump(config))
    proxy = Service(f"proxy-{store}", [sys.executable, "-m", "proxy", "serve", "--config", str(path)], tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        proxy.wait_ready(url + "/readyz", timeout=300)
        originals = [body(p["q"]) for p in work]
        paraphrases = [body(p["p"]) for p in work]
        seeded = summary(loadgen(url, originals, 8, len(originals), 300, tmp))
        out: dict[str, Any] = {"seed_misses": seeded, "entries": wait_settled(url)}
        for name, bodies in (("exact", originals), ("semantic", paraphrases)):
            for c, n in ((1, args.n1), (16, args.n16)):
                out[f"{name}_c{c}"] = summary(loadgen(url, bodies, c, n, args.max_seconds, tmp,
                                                      warmup=bodies[:50]))
        out["cache_errors"] = cache_errors(url)
        out["breaker_opened"] = proxy.log_path.read_text(errors="replace").count("circuit breaker open")
        return out
    finally:
        proxy.stop()


async def fill(url: str, namespace: str, n: int, dim: int) -> float:
    store = RedisStore(url=url, namespace=namespace, clock=SystemClock(), max_entries=n * 2,
                       max_bytes=64 << 30, dim=dim,
                       settings=RedisSettings(op_timeout_s=30, write_timeout_s=30, connect_timeout_s=10,
                                             max_connections=32))
    await store.start()
    rng = np.random.default_rng(7)
    answer = "lorem ipsum dolor sit amet " * 22
    started = time.perf_counter()
    now = time.time()
    batch = 256
    for first in range(0, n, batch):
        vectors = rng.standard_normal((min(batch, n - first), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        entries = [Entry(key=uuid.uuid4().hex * 2, scope=f"scope{(first + i) % 50:02d}" + "0" * 56,
                         model=MODEL, route="chat", text=f"question number {first + i}", vector=v,
                         response={"id": "x", "object": "chat.completion", "model": MODEL, "choices": [
                             {"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": answer}}],
                             "usage": {"prompt_tokens": 9, "completion_tokens": 120, "total_tokens": 129}},
                         created=now, expires=now + 86400)
                   for i, v in enumerate(vectors)]
        await asyncio.gather(*(store.put(e) for e in entries))
    seconds = time.perf_counter() - started
    await store.close()
    return seconds


async def rebuild_in_process(url: str, namespace: str, dim: int) -> dict[str, Any]:
    store = RedisStore(url=url, namespace=namespace, clock=SystemClock(), max_entries=10_000_000,
                       max_bytes=64 << 30, settings=RedisSettings(background_timeout_s=60))
    await store.start()
    index = FaissIndex(dim)
    follower = IndexFollower(feed=store, index=index, settings=FollowSettings(rebuild_batch=1000))
    started = time.perf_counter()
    await follower.start()
    assert await follower.wait_synced(600)
    seconds = time.perf_counter() - started
    count = len(index)
    await follower.close()
    await index.close()
    await store.close()
    return {"vectors": count, "seconds": round(seconds, 2), "vectors_per_s": round(count / seconds)}


def rebuild_in_proxy(args: argparse.Namespace, upstream: str, redis: RedisServer, namespace: str,
                     tmp: Path) -> dict[str, Any]:
    port = free_port()
    path = tmp / "rebuild.yaml"
    config = proxy_config("redis", port, upstream, redis.url, namespace, args.models_dir)
    path.write_text(yaml.safe_dump(config))
    proxy = Service("proxy-rebuild", [sys.executable, "-m", "proxy", "serve", "--config", str(path)], tmp)
    try:
        ready_s = proxy.wait_ready(f"http://127.0.0.1:{port}/readyz", timeout=900)
        log = proxy.log_path.read_text(errors="replace")
        found = re.findall(r"index rebuilt from the shared store: (\d+) vectors in ([\d.]+) s", log)
        rss = proxy.rss_mib()
    finally:
        proxy.stop()
    vectors, seconds = found[-1] if found else ("0", "nan")
    return {"vectors": int(vectors), "seconds": float(seconds), "ready_after_s": round(ready_s, 1),
            "proxy_rss_mib": round(rss)}


def redis_memory(redis: RedisServer) -> float:
    with redis.client() as client:
        info = client.info("memory")
    return round(int(info["used_memory"]) / 2**20, 1)


def markdown(result: dict[str, Any]) -> str:
    rows = ["| scenario | store | c | req/s | p50 ms | p99 ms | answered as |",
            "|---|---|---:|---:|---:|---:|---|"]
    for scenario in ("exact_c1", "exact_c16", "semantic_c1", "semantic_c16"):
        for store in ("memory", "redis"):
            s = result["stores"][store][scenario]
            mix = ", ".join(f"{k} {v}" for k, v in sorted(s["semcache"].items()))
            kind, c = scenario.split("_c")
            rows.append(f"| {kind} hit | {store} | {c} | {s['req_s']} | {s['p50_ms']} | {s['p99_ms']} "
                        f"| {mix} |")
    r = result["rebuild"]
    rows += ["", f"Index rebuild from Redis, {r['entries']} entries ({r['redis_used_mib']} MiB in Redis; "
             f"written in {r['fill_s']} s by 1 client):", "",
             "| where | vectors | seconds | vectors/s |", "|---|---:|---:|---:|",
             f"| in-process (RedisStore.vectors -> FaissIndex) | {r['in_process']['vectors']} "
             f"| {r['in_process']['seconds']} | {r['in_process']['vectors_per_s']} |",
             f"| proxy start-up (log line; ready after {r['proxy']['ready_after_s']} s incl. model load) "
             f"| {r['proxy']['vectors']} | {r['proxy']['seconds']} "
             f"| {round(r['proxy']['vectors'] / r['proxy']['seconds']) if r['proxy']['seconds'] else '-'} |"]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=None, help="semantic pairs to cache and ask")
    parser.add_argument("--rebuild", type=int, default=None, help="entries for the rebuild (100000)")
    parser.add_argument("--models-dir", default=str(ROOT / "data" / "models"))
    parser.add_argument("--out", default=None, help="write the raw results here (JSON)")
    args = parser.parse_args()
    args.pairs = args.pairs or (300 if args.quick else 600)
    args.rebuild = args.rebuild or (20_000 if args.quick else 100_000)
    args.n1, args.n16 = (300, 1000) if args.quick else (600, 3000)
    args.max_seconds = 10 if args.quick else 20
    work = pairs(args.pairs)
    with tempfile.TemporaryDirectory(prefix="redis-bench-") as tmpdir:
        tmp = Path(tmpdir)
        upstream_port = free_port()
        upstream = start_upstream(tmp, upstream_port)
        redis = RedisServer(tmp / "redis").start()
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        try:
            stores = {}
            for store in ("memory", "redis"):
                print(f"benchmarking the {store} store ...", file=sys.stderr, flush=True)
                stores[store] = bench_store(store, args, work, upstream_url, redis, tmp)
            redis.flushall()
            namespace = "rebuild"
            print(f"writing {args.rebuild} entries to redis ...", file=sys.stderr, flush=True)
            fill_s = asyncio.run(fill(redis.url, namespace, args.rebuild, 384))
            used = redis_memory(redis)
            print("rebuilding ...", file=sys.stderr, flush=True)
            in_process = asyncio.run(rebuild_in_process(redis.url, namespace, 384))
            proxy = rebuild_in_proxy(args, upstream_url, redis, namespace, tmp)
        finally:
            redis.kill()
            upstream.stop()
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()},
              "pairs": len(work), "stores": stores,
              "rebuild": {"entries": args.rebuild, "fill_s": round(fill_s, 1), "redis_used_mib": used,
                          "in_process": in_process, "proxy": proxy}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
