"""Long schemathesis run against a real proxy process: no 5xx for any input, no crash.

Starts a fake upstream (in this process) and ``python -m proxy serve`` in front of it, reads the
proxy's own /openapi.json, and sends generated requests (valid and invalid, in equal parts) to the
completion routes until ``--cases`` were sent or ``--max-seconds`` ran out. Checks per case: the
status is below 500, and every 4xx is OpenAI-shaped. At the end the proxy must still be alive and
ready; its RSS before and after is reported.

    python -m bench.fuzz --cases 50000 --out bench/results/fuzz.json
    make fuzz                  # the same, bounded by FUZZ_CASES / FUZZ_SECONDS
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import requests
import schemathesis
import yaml
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from bench.fake_upstream import FakeUpstream

REPO = Path(__file__).resolve().parents[1]
ROUTES = (("/v1/chat/completions", "POST"), ("/v1/completions", "POST"))


class LenientUpstream(FakeUpstream):
    """Reads bodies with orjson, as the proxy does (the stock fake re-encodes them and fails on
    numbers the proxy accepts, which would be the fake's 500, not the proxy's)."""

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], str | None]:
        body = orjson.loads(await request.read())
        self.calls += 1
        return body, None


def start_upstream() -> str:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True, name="upstream").start()

    async def serve() -> str:
        runner = web.AppRunner(LenientUpstream(keep_requests=False).app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    return asyncio.run_coroutine_threadsafe(serve(), loop).result(30)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_proxy(root: Path, upstream: str, semantic: bool,
                models_dir: str | None) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = {
        "server": {"host": "127.0.0.1", "port": port, "admin_token_env": None, "log_level": "WARNING",
                   "max_body_bytes": 1 << 20},
        "backends": [{"name": "fake", "base_url": upstream, "api_key_env": None, "health_path": "/health"}],
        "cache": {"semantic": semantic, "max_entries": 20_000},
        "store": {"data_dir": str(root / "data")},
    }
    if models_dir:
        config["embedding"] = {"cache_dir": models_dir}
    path = root / "fuzz.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (root / "proxy.log").open("wb")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"proxy exited with {proc.returncode}: see {root / 'proxy.log'}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("proxy not ready in 180 s")
        time.sleep(0.2)


class Campaign:
    """Cases sent and what came back, across hypothesis runs."""

    def __init__(self, url: str, cases: int, deadline: float) -> None:
        self.url = url
        self.cases = cases
        self.deadline = deadline
        self.sent = 0
        self.statuses: Counter[str] = Counter()
        self.failures: list[dict[str, Any]] = []
        self.session = requests.Session()

    # a method, not a property: mypy would narrow a property across the campaign's loop
    def done(self) -> bool:
        return self.sent >= self.cases or time.monotonic() >= self.deadline

    def check(self, label: str, case: Any) -> None:
        if self.done():
            return
        self.sent += 1
        try:
            response = case.call(base_url=self.url, session=self.session, timeout=30)
        except requests.RequestException as exc:
            self.statuses["no answer"] += 1
            self.failures.append({"route": label, "error": repr(exc)[:300], "body": repr(case.body)[:500]})
            return
        status = response.status_code
        self.statuses[str(status)] += 1
        problem = None
        if status >= 500:
            problem = "5xx"
        elif status >= 400:
            try:
                error = orjson.loads(response.content)["error"]
                if set(error) != {"message", "type", "param", "code"}:
                    problem = "error shape"
            except (orjson.JSONDecodeError, KeyError, TypeError):
                problem = "error not JSON"
        if problem and len(self.failures) < 200:
            self.failures.append({"route": label, "problem": problem, "status": status,
                                  "response": response.text[:300], "body": repr(case.body)[:500]})

    def run(self, operation: Any, mode: GenerationMode, label: str, examples: int) -> None:
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate],
                  report_multiple_bugs=False)
        @given(case=operation.as_strategy(generation_mode=mode))
        def one(case: Any) -> None:
            self.check(label, case)

        one()


def fuzz(url: str, cases: int, max_seconds: float, worker: int = 0) -> dict[str, Any]:
    schema = schemathesis.openapi.from_dict(requests.get(url + "/openapi.json", timeout=10).json())
    campaign = Campaign(url, cases, time.monotonic() + max_seconds)
    plans = [(path, method, mode) for path, method in ROUTES
             for mode in (GenerationMode.NEGATIVE, GenerationMode.POSITIVE)]
    # hypothesis stops a test at its first failure: run in rounds so that one failure does not
    # end the campaign, each round with fresh examples (no example database, a new seed)
    round_size = max(1, min(cases // len(plans), 2500))
    round_no = 0
    while not campaign.done():
        for path, method, mode in plans:
            if campaign.done():
                break
            campaign.run(schema[path][method], mode, f"{method} {path} {mode.value}", round_size)
        round_no += 1
        print(f"worker {worker} round {round_no}: {campaign.sent} cases, {dict(campaign.statuses)}",
              flush=True)
    return {"cases": campaign.sent, "statuses": dict(campaign.statuses), "failures": campaign.failures}


def _worker(args: tuple[str, int, float, int]) -> dict[str, Any]:
    url, cases, max_seconds, worker = args
    return fuzz(url, cases, max_seconds, worker)


def fuzz_parallel(url: str, cases: int, max_seconds: float, workers: int) -> dict[str, Any]:
    """Generation costs more than the request: ``workers`` processes share the cases."""
    if workers <= 1:
        return fuzz(url, cases, max_seconds)
    import multiprocessing

    share = -(-cases // workers)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        parts = pool.map(_worker, [(url, share, max_seconds, i) for i in range(workers)])
    statuses: Counter[str] = Counter()
    for part in parts:
        statuses.update(part["statuses"])
    return {"cases": sum(p["cases"] for p in parts), "statuses": dict(statuses),
            "failures": [f for p in parts for f in p["failures"]][:200], "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=50_000)
    parser.add_argument("--max-seconds", type=float, default=3600)
    parser.add_argument("--semantic", action="store_true", help="semantic caching on (slower: embeds)")
    parser.add_argument("--models-dir", default=os.environ.get("SEMCACHE_TEST_MODEL_CACHE"))
    parser.add_argument("--workers", type=int, default=2, help="processes generating cases")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        upstream = start_upstream()
        proc, url = start_proxy(root, upstream, args.semantic, args.models_dir)
        try:
            rss_before = rss_kib(proc.pid)
            started = time.monotonic()
            report = fuzz_parallel(url, args.cases, args.max_seconds, args.workers)
            report["seconds"] = round(time.monotonic() - started, 1)
            report["alive"] = proc.poll() is None
            report["ready_after"] = (requests.get(url + "/readyz", timeout=10).status_code
                                     if report["alive"] else None)
            report["rss_kib_before"] = rss_before
            report["rss_kib_after"] = rss_kib(proc.pid) if report["alive"] else None
            log_text = (root / "proxy.log").read_text(errors="replace")
            report["log_tracebacks"] = log_text.count("Traceback")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                report_exit = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                report_exit = -9
        report["exit_code"] = report_exit
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if report["failures"] or not report["alive"] or report["exit_code"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
