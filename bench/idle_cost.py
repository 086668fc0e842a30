"""What an idle gap between requests costs a server here, whatever the server does.

    OMP_NUM_THREADS=1 python -m bench.idle_cost [--requests 1500] [--rounds 3]

The fake upstream answers the same request over and over from one keep-alive connection, while
the client pauses ``gap`` between an answer and the next request. The client spins through the
pause, so only the server goes idle. The work per request is identical for every gap; any rise
in the server's CPU per request is what going idle and waking up costs on this machine. A
proxy at c=1 idles twice per request (for its client, then for its upstream), so on a machine
where this cost is large its c=1 CPU per request carries it too (docs/benchmarks.md, "Idle
gaps"). Nothing here is a test: it prints a Markdown table, medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.procs import free_port, pid_cpu_s, start_upstream

GAPS_MS = (0.0, 0.5, 1.0, 2.0)
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hello"}]}'


async def _cpu_per_request(url: str, pid: int, gap_s: float, requests: int) -> float:
    """The server's CPU ms per request over ``requests`` calls with ``gap_s`` between them."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        before = pid_cpu_s(pid)
        for _ in range(requests):
            async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as resp:
                await resp.read()
            until = time.perf_counter() + gap_s
            while time.perf_counter() < until:
                pass
        return (pid_cpu_s(pid) - before) / requests * 1000


async def measure(url: str, pid: int, requests: int, rounds: int) -> dict[float, list[float]]:
    await _cpu_per_request(url, pid, 0.0, 200)   # warm-up: connection, first allocations
    found: dict[float, list[float]] = {gap: [] for gap in GAPS_MS}
    for _ in range(rounds):
        for gap in GAPS_MS:   # interleaved, so drift on a shared machine hits every gap alike
            found[gap].append(await _cpu_per_request(url, pid, gap / 1000, requests))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="requests per gap and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        upstream = start_upstream(Path(logs), port)
        try:
            found = asyncio.run(measure(f"http://127.0.0.1:{port}/v1/chat/completions", upstream.pid,
                                        args.requests, args.rounds))
        finally:
            upstream.stop()
    base = statistics.median(found[0.0])
    print("| gap between requests (ms) | server CPU ms/request, median | range over rounds | vs no gap |")
    print("|---:|---:|---|---:|")
    for gap, values in found.items():
        mid = statistics.median(values)
        print(f"| {gap:g} | {mid:.3f} | {min(values):.3f}-{max(values):.3f} | {mid / base:.2f}x |")


if __name__ == "__main__":
    main()
