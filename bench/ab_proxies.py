"""CPU per request of two versions of the proxy, measured side by side in interleaved bursts.

    git worktree add /tmp/base HEAD~1        # the version to compare against (its data/ is not needed)
    OMP_NUM_THREADS=1 python -m bench.ab_proxies --base /tmp/base [--config bench/configs/cache_off.yaml]
        [--kind unique|exact] [--c 1] [--rounds 10] [--requests 1500]

One fake upstream, two proxy processes started from the two source trees with the same config
(``--base``'s ``proxy`` package, and this tree's), and bursts of requests sent to each in turn,
the order flipped every round. On a shared machine whose speed drifts by tens of percent between
minutes (docs/benchmarks.md, "Idle gaps"), interleaving is what makes a difference of a few
percent visible: both versions meet the same drift. Prints each version's CPU ms per request
(median over rounds) and the median of the per-round ratios. ``--kind exact`` repeats one
request (exact hits with a cache-on config); ``unique`` sends a fresh prompt every time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.procs import ROOT, Service, free_port, start_proxy, start_upstream

HEADERS = {"Authorization": "Bearer sk-bench", "content-type": "application/json"}


def bodies(kind: str) -> Callable[[], bytes]:
    if kind == "exact":
        fixed = orjson.dumps({"model": "deepseek-chat",
                              "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        return lambda: fixed
    counter = itertools.count()
    return lambda: orjson.dumps({"model": "deepseek-chat",
                                 "messages": [{"role": "user", "content": f"question {next(counter)}"}]})


async def burst(url: str, requests: int, c: int, body: Callable[[], bytes]) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=c)) as session:
        async def worker(count: int) -> None:
            for _ in range(count):
                async with session.post(url, data=body(), headers=HEADERS) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url} answered {resp.status}")
        await asyncio.gather(*(worker(requests // c) for _ in range(c)))


async def compare(proxies: dict[str, tuple[Service, str]], *, kind: str, c: int, rounds: int,
                  requests: int) -> dict[str, list[float]]:
    body = bodies(kind)
    for _, url in proxies.values():
        await burst(url, 300, c, body)   # warm-up (and, for exact hits, the stored answer)
    found: dict[str, list[float]] = {name: [] for name in proxies}
    for r in range(rounds):
        order = list(proxies) if r % 2 == 0 else list(reversed(proxies))
        for name in order:
            service, url = proxies[name]
            await asyncio.sleep(0.3)   # background stores of the last burst finish off the clock
            before = service.cpu_s()
            await burst(url, requests, c, body)
            await asyncio.sleep(0.2)
            found[name].append((service.cpu_s() - before) / requests * 1000)
    return found


def config_for(source: Path, port: int, upstream: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config.setdefault("server", {})["port"] = port
    config["backends"][0]["base_url"] = upstream
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="source tree of the other version")
    parser.add_argument("--config", type=Path, default=ROOT / "bench" / "configs" / "cache_off.yaml")
    parser.add_argument("--kind", choices=("unique", "exact"), default="unique")
    parser.add_argument("--c", type=int, default=1, help="concurrent requests")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1500, help="requests per burst")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        upstream_port = free_port()
        upstream = start_upstream(logs, upstream_port)
        started: dict[str, tuple[Service, str]] = {}
        try:
            for name, tree in (("base", args.base.resolve()), ("new", ROOT)):
                port = free_port()
                path = logs / f"{name}.yaml"
                path.write_text(yaml.safe_dump(config_for(args.config, port,
                                                          f"http://127.0.0.1:{upstream_port}")))
                service = start_proxy(name, path, logs, cwd=tree)
                url = f"http://127.0.0.1:{port}"
                started[name] = (service, url + "/v1/chat/completions")
                service.wait_ready(url + "/readyz", timeout=120)
            found = asyncio.run(compare(started, kind=args.kind, c=args.c, rounds=args.rounds,
                                        requests=args.requests))
        finally:
            for service, _ in started.values():
                service.stop()
            upstream.stop()
    for name, values in found.items():
        print(f"{name}: {statistics.median(values):.3f} CPU ms/request (median of {len(values)} bursts; "
              f"{min(values):.3f}-{max(values):.3f})")
    ratios = [new / base for base, new in zip(found["base"], found["new"], strict=True)]
    print(f"new / base: {statistics.median(ratios):.3f} (median of per-round ratios; "
          f"{min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
