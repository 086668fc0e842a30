"""Does the batch window pay? Two measurements through the real proxy (cache off, so every
request reaches the backend):

(a) ``sim``: a simulated batch-friendly backend whose cost per call has a fixed part, like a GPU
    forward pass: each call takes ``fixed_ms + per_prompt_ms * prompts`` and calls run one at a
    time. Compared at the same offered load, with the window (vllm-type backend, compatible
    completions merged into one call) and without (window 0, one call per request):
    - saturation: ``concurrency`` closed-loop clients -> requests/s, p50/p99 latency;
    - light load: open-loop arrivals at ``light_rps`` (a rate the unbatched backend keeps up
      with) -> the p99 the window adds.
(b) ``llama``: llama.cpp's server with SmolLM2-135M (tests/llamacpp.py): ``concurrency`` short
    completions at once, batched (one call with a list of prompts) vs unbatched (one call each),
    completion tokens/s, ``repeats`` rounds alternating the modes, medians.

    python -m bench.batching_bench sim   [--seconds 8 --concurrency 64 --window-ms 20 ...]
    python -m bench.batching_bench llama [--repeats 3 --concurrency 8 --max-tokens 32]
    python -m bench.batching_bench all --json bench/results/batching.json

The simulated backend also runs alone: ``python -m bench.batching_bench serve-sim --port 9200``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from bench.procs import Service, free_port, start_proxy

# -- the simulated batch-friendly backend -------------------------------------------------------


@dataclass
class SimBackend:
    fixed_s: float = 0.050
    per_prompt_s: float = 0.002
    calls: int = 0
    prompts: int = 0
    _busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        return app

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def stats(self, _: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls, "prompts": self.prompts})

    async def completions(self, request: web.Request) -> web.Response:
        body = await request.json()
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        async with self._busy:   # one forward pass at a time, like one GPU
            await asyncio.sleep(self.fixed_s + self.per_prompt_s * len(prompts))
        self.calls += 1
        self.prompts += len(prompts)
        choices = [{"index": i, "text": f" echo {str(p)[-24:]}", "logprobs": None, "finish_reason": "stop"}
                   for i, p in enumerate(prompts)]
        return web.json_response({
            "id": f"cmpl-sim{self.calls}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model"), "choices": choices,
            "usage": {"prompt_tokens": 8 * len(prompts), "completion_tokens": 4 * len(prompts),
                      "total_tokens": 12 * len(prompts)}})


# -- load -----------------------------------------------------------------------------------------


@dataclass
class Run:
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    tokens: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, float]:
        return {"requests": self.requests, "errors": self.errors, "seconds": round(self.seconds, 3),
                "rps": round(self.rps, 2), "p50_ms": round(self.pct(0.50), 1),
                "p99_ms": round(self.pct(0.99), 1)}


def completion_body(prompt: str, max_tokens: int = 8) -> dict[str, Any]:
    return {"model": "sim", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


Answer = dict[str, Any] | None


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[float, Answer]:
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as resp:
        data = await resp.read()
        ok = resp.status == 200
    elapsed = (time.perf_counter() - started) * 1000
    return elapsed, (json.loads(data) if ok else None)


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    async def ask(self, session: aiohttp.ClientSession, url: str, prompt: str) -> None:
        ms, answer = await one(session, url, completion_body(prompt))
        if answer is None:
            self.errors += 1
        else:
            self.latencies_ms.append(ms)

    def run(self, seconds: float) -> Run:
        return Run(len(self.latencies_ms), seconds, self.latencies_ms, self.errors)


async def closed_loop(url: str, concurrency: int, seconds: float, tag: str) -> Run:
    """``concurrency`` clients, each sending its next request as soon as the last is answered;
    the time includes draining the requests still open at the end (served at the same rate)."""
    tally = Tally()
    counter = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        stop_at = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            nonlocal counter
            while time.perf_counter() < stop_at:
                counter += 1
                await tally.ask(session, url, f"{tag} client {w} request {counter}")

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return tally.run(time.perf_counter() - started)


async def open_loop(url: str, rps: float, seconds: float, tag: str, seed: int = 7) -> Run:
    """Poisson arrivals at ``rps`` whatever the answers do (a fixed seed: both modes get the
    same arrival times)."""
    rng = random.Random(seed)
    tally = Tally()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        at = 0.0
        while at < seconds:
            delay = started + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(tally.ask(session, url, f"{tag} arrival {len(tasks)}")))
            at += rng.expovariate(rps)
        await asyncio.gather(*tasks)
        return tally.run(time.perf_counter() - started)


# -- processes ------------------------------------------------------------------------------------


def proxy_config(port: int, backend_url: str, window_ms: float, max_batch: int) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": port, "admin_token_env": None, "max_in_flight": 4096,
                   "log_level": "WARNING"},
        "backends": [{"name": "local", "type": "vllm", "base_url": backend_url, "api_key_env": None,
                      "models": ["*"], "max_concurrency": 256,
                      "batch": {"max_wait_ms": window_ms, "max_batch": max_batch, "max_queue": 4096}}],
        "cache": {"enabled": False},
        "store": {"data_dir": ""},
    }


@contextmanager
def proxy(name: str, workdir: Path, backend_url: str, window_ms: float, max_batch: int) -> Iterator[str]:
    port = free_port()
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(proxy_config(port, backend_url, window_ms, max_batch)))
    svc = start_proxy(name, path, workdir)
    try:
        url = f"http://127.0.0.1:{port}"
        svc.wait_ready(url + "/readyz", timeout=60)
        yield url
    finally:
        svc.stop()


def sim_stats(url: str) -> dict[str, int]:
    import urllib.request
    with urllib.request.urlopen(url + "/stats", timeout=5) as resp:
        stats: dict[str, int] = json.loads(resp.read())
        return stats


def run_sim(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": {
        "fixed_ms": args.fixed_ms, "per_prompt_ms": args.per_prompt_ms, "window_ms": args.window_ms,
        "max_batch": args.max_batch, "concurrency": args.concurrency, "seconds": args.seconds,
        "light_rps": args.light_rps, "light_seconds": args.light_seconds}}
    with tempfile.TemporaryDirectory(prefix="batching-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        sim = Service("sim_backend", [sys.executable, "-m", "bench.batching_bench", "serve-sim",
                                      "--port", str(port), "--fixed-ms", str(args.fixed_ms),
                                      "--per-prompt-ms", str(args.per_prompt_ms)], workdir)
        sim_url = f"http://127.0.0.1:{port}"
        try:
            sim.wait_ready(sim_url + "/health", timeout=30)
            for mode, window in (("unbatched", 0.0), ("batched", args.window_ms)):
                with proxy(mode, workdir, sim_url, window, args.max_batch) as url:
                    asyncio.run(closed_loop(url, 4, 1.0, f"warm {mode}"))
                    before = sim_stats(sim_url)
                    heavy = asyncio.run(closed_loop(url, args.concurrency, args.seconds, f"heavy {mode}"))
                    after = sim_stats(sim_url)
                    light = asyncio.run(open_loop(url, args.light_rps, args.light_seconds, f"light {mode}"))
                calls = after["calls"] - before["calls"]
                prompts = after["prompts"] - before["prompts"]
                out[mode] = {"saturation": heavy.summary(), "light": light.summary(),
                             "backend_calls": calls, "prompts_per_call": round(prompts / max(1, calls), 2)}
                print(f"sim {mode:9s} saturation {heavy.summary()}  light {light.summary()}  "
                      f"calls {calls}", flush=True)
        finally:
            sim.stop()
    u, b = out["unbatched"], out["batched"]
    out["speedup"] = round(b["saturation"]["rps"] / u["saturation"]["rps"], 2)
    out["light_p50_added_ms"] = round(b["light"]["p50_ms"] - u["light"]["p50_ms"], 1)
    out["light_p99_added_ms"] = round(b["light"]["p99_ms"] - u["light"]["p99_ms"], 1)
    return out


# -- llama.cpp ------------------------------------------------------------------------------------

LLAMA_PROMPTS = ["The capital of France is", "Two plus two equals", "The opposite of hot is",
                 "A baby cat is called a", "The largest planet is", "Water boils at",
                 "The first month of the year is", "Bees make", "The color of grass is",
                 "A week has", "Ice is made of", "The sun rises in the"]


async def llama_round(url: str, llama_url: str, concurrency: int, max_tokens: int, tag: str) -> Run:
    prompts = [f"{LLAMA_PROMPTS[i % len(LLAMA_PROMPTS)]} ({tag}-{i})" for i in range(concurrency)]
    bodies = [{**completion_body(p, max_tokens), "model": "smollm2"} for p in prompts]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(session, url, b) for b in bodies))
        elapsed = time.perf_counter() - started
        tokens = 0
        errors = 0
        for _, answer in results:
            if answer is None:
                errors += 1
                continue
            choice = answer["choices"][0]
            if choice.get("finish_reason") == "length":
                tokens += max_tokens
            else:  # stopped early: count what it wrote with the server's own tokenizer
                async with session.post(llama_url + "/tokenize", json={"content": choice["text"]}) as resp:
                    tokens += len((await resp.json())["tokens"])
    return Run(len(results) - errors, elapsed, [ms for ms, _ in results], errors, tokens)


def run_llama(args: argparse.Namespace) -> dict[str, Any]:
    from tests.llamacpp import LlamaServer, unavailable

    reason = unavailable()
    if reason is not None:
        print(f"llama: skipped, {reason}")
        return {"skipped": reason}
    out: dict[str, Any] = {"settings": {"concurrency": args.concurrency, "max_tokens": args.max_tokens,
                                        "repeats": args.repeats, "parallel_slots": args.parallel,
                                        "threads": 1, "window_ms": args.llama_window_ms}}
    rounds: dict[str, list[Run]] = {"unbatched": [], "batched": []}
    with tempfile.TemporaryDirectory(prefix="batching-llama-") as tmp, \
            LlamaServer(parallel=args.parallel) as llama:
        workdir = Path(tmp)
        with proxy("unbatched", workdir, llama.url, 0.0, args.concurrency) as plain, \
                proxy("batched", workdir, llama.url, args.llama_window_ms, args.concurrency) as batched:
            urls = {"unbatched": plain, "batched": batched}
            asyncio.run(llama_round(plain, llama.url, 2, 4, "warm"))
            for r in range(args.repeats):
                order = ("batched", "unbatched") if r % 2 else ("unbatched", "batched")
                for mode in order:
                    run = asyncio.run(llama_round(urls[mode], llama.url, args.concurrency, args.max_tokens,
                                                  f"r{r}{mode[0]}"))
                    rounds[mode].append(run)
                    print(f"llama {mode:9s} round {r}: {run.tokens} tokens in {run.seconds:.2f} s = "
                          f"{run.tokens / run.seconds:.1f} tokens/s (errors {run.errors})", flush=True)
    for mode, runs in rounds.items():
        out[mode] = {"tokens_per_s": [round(r.tokens / r.seconds, 2) for r in runs],
                     "seconds": [round(r.seconds, 3) for r in runs],
                     "median_tokens_per_s": round(statistics.median(r.tokens / r.seconds for r in runs), 2),
                     "errors": sum(r.errors for r in runs)}
    out["ratio"] = round(out["batched"]["median_tokens_per_s"] / out["unbatched"]["median_tokens_per_s"], 2)
    return out


# -- CLI ------------------------------------------------------------------------------------------


def with_concurrency(args: argparse.Namespace, default: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "concurrency": args.concurrency or default})


def serve_sim(args: argparse.Namespace) -> None:
    sim = SimBackend(fixed_s=args.fixed_ms / 1000, per_prompt_s=args.per_prompt_ms / 1000)
    web.run_app(sim.app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sim", "llama", "all", "serve-sim"])
    parser.add_argument("--port", type=int, default=9200, help="serve-sim: port")
    parser.add_argument("--fixed-ms", type=float, default=50.0)
    parser.add_argument("--per-prompt-ms", type=float, default=2.0)
    parser.add_argument("--window-ms", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="sim: closed-loop clients (64); llama: completions at once (8)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--light-rps", type=float, default=5.0)
    parser.add_argument("--light-seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--parallel", type=int, default=4, help="llama.cpp slots (-np)")
    parser.add_argument("--llama-window-ms", type=float, default=50.0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.what == "serve-sim":
        serve_sim(args)
        return
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.what in ("sim", "all"):
        results["sim"] = run_sim(with_concurrency(args, 64))
    if args.what in ("llama", "all"):
        results["llama"] = run_llama(with_concurrency(args, 8))
    print(json.dumps(results, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
