"""Replica scaling on this machine: 1 vs 2 proxy processes sharing one Redis; Redis operations per
request on each path, counted.

    OMP_NUM_THREADS=1 python -m bench.replica_bench              # ~4 minutes on 2 cores
    OMP_NUM_THREADS=1 python -m bench.replica_bench --quick      # ~2 minutes
    python -m bench.replica_bench --json bench/results/replicas.json

Processes: the fake upstream (0 ms), one ``redis-server`` (no persistence), and two proxies
(``bench/configs/cache_on.yaml`` with ``store.type: redis``, one namespace, one tenant secret, so
they share every entry). The load generator (its own process) sends to one proxy, or round-robin
to both (no load balancer in between), at c=32; the two layouts alternate, repetition by
repetition, so both see the same machine. Exact hits repeat seeded questions; semantic hits send
their paraphrases (a freshly seeded tenant per run: a lookup that times out stores the paraphrase
under its own key, and the next run would find it as an exact hit).

Redis operations per request are counted with ``MONITOR`` (``redis-cli monitor``) over separate,
untimed runs at c=4 through one proxy while the other one runs its index follower: commands sent by
the proxies (each EVALSHA counted once, pipelined commands one by one) and the commands the Lua
scripts run inside Redis, per request, by command name, minus what an idle pair of replicas sends
in the same time (the followers' blocking stream reads).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from bench.procs import ROOT, Service, bench_env, free_port, get_json, pid_cpu_s, start_proxy, start_upstream
from bench.run_bench import SEED_CONCURRENCY, Prompts, chat_body, load_pairs, metrics_sample, pct, vocabulary
from tests.redis_server import RedisServer

HERE = Path(__file__).resolve().parent
SECRET = "bench-replicas-tenant-secret"
MONITOR_LINE = re.compile(r'^[\d.]+ \[\d+ ([^\]]+)\] "([A-Za-z]+)"')


class Replicas:
    def __init__(self, tmp: Path, pairs: list[dict[str, Any]]) -> None:
        self.tmp = tmp
        self.pairs = pairs
        self.prompts = Prompts(vocabulary(pairs), seed=int(time.time()))
        up_port = free_port()
        self.upstream = start_upstream(tmp, up_port)
        self.redis = RedisServer(tmp / "redis").start()
        self.proxies: list[Service] = []
        self.urls: list[str] = []
        env = {**bench_env(), "SEMCACHE_TENANT_SECRET": SECRET}
        for i in range(2):
            config = yaml.safe_load((HERE / "configs" / "cache_on.yaml").read_text())
            port = free_port()
            config["server"]["port"] = port
            config["backends"][0]["base_url"] = f"http://127.0.0.1:{up_port}"
            config["store"] = {"type": "redis", "url": self.redis.url, "namespace": "bench", "data_dir": ""}
            path = tmp / f"replica{i}.yaml"
            path.write_text(yaml.safe_dump(config))
            self.proxies.append(start_proxy(f"replica{i}", path, tmp, env=env))
            self.urls.append(f"http://127.0.0.1:{port}")
        for svc, url in zip(self.proxies, self.urls, strict=True):
            svc.wait_ready(url + "/readyz", timeout=600)

    def stop(self) -> None:
        for svc in self.proxies:
            svc.stop()
        self.upstream.stop()
        self.redis.kill()

    def cpu(self) -> dict[str, float]:
        assert self.redis.proc is not None
        return {"replica0": self.proxies[0].cpu_s(), "replica1": self.proxies[1].cpu_s(),
                "redis": pid_cpu_s(self.redis.proc.pid), "upstream": self.upstream.cpu_s()}

    def idle(self) -> None:
        for svc in (*self.proxies, self.upstream):
            svc.wait_idle()

    def load(self, urls: list[str], bodies: list[str], c: int, n: int, max_s: float, tenant: str,
             warmup: list[str] | None = None) -> dict[str, Any]:
        """One loadgen process; CPU of every server process around the measured part."""
        spec = {"urls": [u + "/v1/chat/completions" for u in urls], "bodies": bodies,
                "warmup": warmup or [], "concurrency": c, "requests": n, "max_seconds": max_s,
                "headers": {"Authorization": f"Bearer {tenant}"}}
        path = self.tmp / "spec.json"
        path.write_text(json.dumps(spec))
        proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", str(path)], cwd=ROOT, env=bench_env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        if not json.loads(proc.stdout.readline() or "{}").get("ready"):
            proc.kill()
            raise RuntimeError("load generator failed during warm-up")
        before = self.cpu()
        faults = self.lookup_faults()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        raw: dict[str, Any] = json.loads(proc.stdout.readline())
        proc.wait(30)
        time.sleep(0.2)  # stores run after the answer: keep them inside the window
        after = self.cpu()
        faults = self.lookup_faults() - faults
        lat = raw["latency_ms"]
        count = len(lat) or 1
        return {"n": len(lat), "rps": len(lat) / raw["wall_s"], "p50_ms": pct(lat, 0.5),
                "p99_ms": pct(lat, 0.99),
                "cpu_ms": {k: (after[k] - before[k]) * 1000 / count for k in after},
                "client_cpu_ms": raw["client_cpu_s"] * 1000 / count, "semcache": raw["semcache"],
                "errors": raw["errors"], "status": raw["status"], "lookup_faults": faults}

    def lookup_faults(self) -> float:
        """Cache faults turned into misses (mostly lookups past their time budget), both replicas."""
        return sum(metrics_sample(url, ("semcache_cache_errors_total",))["semcache_cache_errors_total"]
                   for url in self.urls)

    def entries(self) -> int:
        return int(get_json(self.urls[0] + "/admin/cache/stats")["entries"])

    def seed(self, tenant: str, count: int) -> dict[str, Any]:
        """Store ``count`` original questions through replica 0; wait until stored and followed.
        Gently (``SEED_CONCURRENCY``): a seed whose lookup timed out is stored without a vector."""
        before = self.entries()
        bodies = [chat_body(p["q"]) for p in self.pairs[:count]]
        raw = self.load(self.urls[:1], bodies, SEED_CONCURRENCY, count, 300, tenant)
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 1.0:
            now = self.entries()
            if now != last:
                last, since = now, time.monotonic()
            time.sleep(0.1)
        time.sleep(1.0)  # the other replica's follower applies the stream's inserts to its index
        return {"stored": last - before, "answers": raw["semcache"]}

    # Redis operations ---------------------------------------------------------------------------

    def monitor(self, seconds: float | None, urls: list[str] | None = None, bodies: list[str] | None = None,
                tenant: str = "") -> tuple[Counter[str], Counter[str], float, dict[str, Any]]:
        """Commands seen by MONITOR during a run (or ``seconds`` of idling): sent by clients and
        run inside scripts, by name; the seconds it took and the requests answered."""
        out = self.tmp / "monitor.txt"
        with open(out, "w", encoding="utf-8") as handle:
            spy = subprocess.Popen(["redis-cli", "-p", str(self.redis.port), "monitor"], stdout=handle,
                                   stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            started = time.monotonic()
            run: dict[str, Any] = {"n": 0, "semcache": {}}
            if seconds is not None:
                time.sleep(seconds)
            else:
                assert urls is not None and bodies is not None
                run = self.load(urls, bodies, 4, len(bodies), 120, tenant)
                time.sleep(0.5)
            took = time.monotonic() - started
            spy.terminate()
            spy.wait(10)
        sent: Counter[str] = Counter()
        scripted: Counter[str] = Counter()
        for line in out.read_text(errors="replace").splitlines():
            match = MONITOR_LINE.match(line)
            if match:
                (scripted if match.group(1) == "lua" else sent)[match.group(2).upper()] += 1
        return sent, scripted, took, run

    def redis_ops(self, n: int) -> dict[str, Any]:
        idle_sent, idle_scripted, idle_s, _ = self.monitor(3.0)
        paths: dict[str, Any] = {}
        originals = [chat_body(p["q"]) for p in self.pairs[:n]]
        paraphrases = [chat_body(p["p"]) for p in self.pairs[:n]]
        self.seed("ops-hits", n)
        workloads = {
            "miss (cache on: lookup, lease, store)": [chat_body(t) for t in self.prompts.take(n)],
            "exact hit": originals,
            "semantic hit": paraphrases,
            "streamed miss": [chat_body(t, stream=True) for t in self.prompts.take(n)],
        }
        for name, bodies in workloads.items():
            tenant = "ops-hits" if "hit" in name else f"ops-{len(paths)}"
            self.idle()
            sent, scripted, took, run = self.monitor(None, self.urls[:1], bodies, tenant)
            rate, answered = took / idle_s, max(run["n"], 1)

            def per_request(counts: Counter[str], idle: Counter[str], rate: float = rate,
                            answered: int = answered) -> dict[str, float]:
                return {cmd: round(max(0.0, counts[cmd] - idle[cmd] * rate) / answered, 2)
                        for cmd in sorted(set(counts) | set(idle)) if counts[cmd]}

            def total(counts: Counter[str], idle: Counter[str], rate: float = rate,
                      answered: int = answered) -> float:
                return round((sum(counts.values()) - sum(idle.values()) * rate) / answered, 2)

            paths[name] = {"requests": run["n"], "answers": run["semcache"],
                           "sent": per_request(sent, idle_sent),
                           "scripted": per_request(scripted, idle_scripted),
                           "sent_total": total(sent, idle_sent),
                           "scripted_total": total(scripted, idle_scripted)}
        return {"idle_per_s": {k: round(v / idle_s, 2) for k, v in (idle_sent + idle_scripted).items()},
                "paths": paths}

    def memory_per_entry(self, n: int) -> dict[str, Any]:
        with self.redis.client() as client:
            before = int(client.info("memory")["used_memory"])
            stats_before = self.entries()
            self.seed("memory", n)
            after = int(client.info("memory")["used_memory"])
        stored = self.entries() - stats_before
        return {"entries": stored, "bytes_per_entry": round((after - before) / stored) if stored else None}


def throughput(rep: Replicas, reps: int, n: int, max_s: float, seeds: int) -> dict[str, list[dict[str, Any]]]:
    """Misses (cache on), exact and semantic hits at c=32 through 1 and through 2 replicas,
    the two layouts alternating."""
    runs: dict[str, list[dict[str, Any]]] = {}
    originals = [chat_body(p["q"]) for p in rep.pairs[:seeds]]
    paraphrases = [chat_body(p["p"]) for p in rep.pairs[:seeds]]
    rep.seed("tp-exact", seeds)
    for r in range(reps):
        for layout in ((1, 2) if r % 2 == 0 else (2, 1)):
            urls = rep.urls[:layout]
            rep.idle()
            unique = [chat_body(t) for t in rep.prompts.take(n + 64)]
            runs.setdefault(f"miss|{layout}", []).append(
                rep.load(urls, unique[64:], 32, n, max_s, f"tp-miss-{r}-{layout}", warmup=unique[:64]))
            rep.idle()
            runs.setdefault(f"exact|{layout}", []).append(
                rep.load(urls, originals, 32, n, max_s, "tp-exact", warmup=originals[:64]))
            tenant = f"tp-semantic-{r}-{layout}"
            seeded = rep.seed(tenant, seeds)
            rep.idle()
            row = rep.load(urls, paraphrases, 32, n, max_s, tenant, warmup=paraphrases[-64:])
            row["seeded"] = seeded
            runs.setdefault(f"semantic|{layout}", []).append(row)
            print(f"[rep {r + 1}/{reps}] {layout} replica(s): "
                  + ", ".join(f"{path} {runs[f'{path}|{layout}'][-1]['rps']:.0f} req/s"
                              for path in ("miss", "exact", "semantic")), file=sys.stderr, flush=True)
    return runs


def med(values: list[float]) -> float:
    return statistics.median(values)


def markdown(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [f"Command: `{result['command']}`; load average at start {result['loadavg_start']}, "
             f"at end {result['loadavg_end']}; proxy code {result['code']}.", "",
             "| path (c=32) | replicas | req/s | p50 ms | p99 ms | proxy CPU ms/req (both) "
             "| Redis CPU ms/req | client CPU ms/req | answered as (all reps) | lookup faults (all reps) "
             "| req/s, 2 vs 1 replica (median of per-rep ratios) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for path in ("miss", "exact", "semantic"):
        ones, twos = runs[f"{path}|1"], runs[f"{path}|2"]
        ratio = med([b["rps"] / a["rps"] for a, b in zip(ones, twos, strict=False)])
        for layout, rows in ((1, ones), (2, twos)):
            answers = sum((Counter(r["semcache"]) for r in rows), Counter())
            lines.append(
                f"| {path if path == 'miss' else path + ' hit'} | {layout} "
                f"| {med([r['rps'] for r in rows]):.0f} "
                f"| {med([r['p50_ms'] for r in rows]):.1f} | {med([r['p99_ms'] for r in rows]):.1f} "
                f"| {med([r['cpu_ms']['replica0'] + r['cpu_ms']['replica1'] for r in rows]):.2f} "
                f"| {med([r['cpu_ms']['redis'] for r in rows]):.2f} "
                f"| {med([r['client_cpu_ms'] for r in rows]):.2f} "
                f"| {', '.join(f'{k} {v}' for k, v in sorted(answers.items()))} "
                f"| {sum(r.get('lookup_faults', 0) for r in rows):.0f} "
                f"| {f'{ratio:.2f}' if layout == 2 else ''} |")
    ops = result["redis_ops"]
    idle = ", ".join(f"{k} {v}/s" for k, v in ops["idle_per_s"].items())
    lines += ["", "Redis commands per request (MONITOR, c=4, one replica serving, the other following; "
              f"idle traffic subtracted: {idle})", "",
              "| path (answers) | requests | sent by the proxies | run inside Lua scripts "
              "| by command (sent; scripted) |",
              "|---|---:|---:|---:|---|"]
    for name, found in ops["paths"].items():
        name = f"{name} ({', '.join(f'{k} {v}' for k, v in sorted(found['answers'].items()))})"
        detail = ", ".join(f"{k} {v}" for k, v in found["sent"].items() if v)
        inner = ", ".join(f"{k} {v}" for k, v in found["scripted"].items() if v)
        lines.append(f"| {name} | {found['requests']} | {found['sent_total']} | {found['scripted_total']} "
                     f"| {detail}; {inner or '-'} |")
    mem = result["memory"]
    lines += ["", f"Redis memory: {mem['bytes_per_entry']} bytes per entry ({mem['entries']} entries of the "
              "fake upstream's short answers; INFO memory used_memory before and after)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="1 vs 2 proxy replicas sharing one Redis")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reps, n, max_s, seeds = (2, 1000, 5.0, 300) if args.quick else (3, 3000, 10.0, 600)
    reps = args.reps or reps
    from bench.bench_report import code_version

    pairs = load_pairs()
    result: dict[str, Any] = {"command": "python -m bench.replica_bench " + " ".join(sys.argv[1:]),
                              "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                              "code": code_version()}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="semcache-replicas-") as tmp_name:
        rep = Replicas(Path(tmp_name), pairs)
        try:
            result["runs"] = throughput(rep, reps, n, max_s, seeds)
            result["redis_ops"] = rep.redis_ops(200)
            result["memory"] = rep.memory_per_entry(500)
        finally:
            rep.stop()
    result["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    print(markdown(result))
    print(f"\nwhole run {result['elapsed_s']} s", file=sys.stderr)
    out = args.json or ROOT / "bench" / "results" / f"replicas-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
