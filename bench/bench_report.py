"""Tables of ``bench.run_bench``: medians over repetitions, ratios within a repetition, goals.

Every ratio is computed per repetition (the proxy run against the direct run, or against the peer's
run, of the same repetition: same minute, same load on the shared machine), then the median of the
ratios is taken. Row names are ``<scenario key>|<c>|<stream>``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Any

from bench.procs import ROOT


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


# issue #8's targets
GOALS: dict[tuple[str, int], Goal] = {
    ("off-miss", 1): Goal("proxy_cpu_ms", "<=", 0.5, "CPU <= 0.5 ms/req"),
    ("off-miss", 32): Goal("proxy_cpu_ms", "<=", 0.5, "CPU <= 0.5 ms/req"),
    ("exact-hit", 1): Goal("proxy_cpu_ms", "<=", 0.3, "CPU <= 0.3 ms/req"),
    ("exact-hit", 32): Goal("proxy_cpu_ms", "<=", 0.3, "CPU <= 0.3 ms/req"),
    ("exact-hit-long", 1): Goal("proxy_cpu_ms", "<=", 0.3, "CPU <= 0.3 ms/req"),
    ("exact-hit-long", 32): Goal("proxy_cpu_ms", "<=", 0.3, "CPU <= 0.3 ms/req"),
    ("semantic-hit", 1): Goal("p50_ms", "<=", 10.0, "p50 <= 10 ms"),
    ("semantic-hit", 32): Goal("rps", ">=", 300.0, ">= 300 req/s"),
    ("exact-stream-hit", 1): Goal("ttft_p50_ms", "<=", 5.0, "TTFT <= 5 ms"),
    ("semantic-stream-hit", 1): Goal("ttft_p50_ms", "<=", 5.0, "TTFT <= 5 ms"),
}

# our scenario -> the peer's run of the same workload
PEER_OF = {"off-miss": "peer-off-miss", "on-miss": "peer-on-miss", "exact-hit": "peer-exact-hit",
           "off-stream": "peer-off-stream", "exact-stream-hit": "peer-exact-stream-hit"}

METRICS = ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms", "ttft_p50_ms", "ttft_p99_ms",
           "proxy_cpu_ms", "upstream_cpu_ms", "client_cpu_ms", "proxy_peak_rss_mib", "hit_share",
           "embed_batch_mean", "cache_errors", "similarity_p50")


def median(values: list[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return statistics.median(real) if real else None


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _paired(agg: dict[str, Any], prefix: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]],
            stream: bool) -> None:
    """Figures of the other run (``prefix``) of each repetition and per-repetition differences."""
    for metric in ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "ttft_p50_ms", "proxy_cpu_ms",
                   "proxy_peak_rss_mib"):
        agg[f"{prefix}_{metric}"] = median([other.get(metric) for _, other in pairs])
    agg[f"{prefix}_rps_ratio"] = median([_ratio(r["rps"], o["rps"]) for r, o in pairs])
    agg[f"{prefix}_p50_added_ms"] = median([r["p50_ms"] - o["p50_ms"] for r, o in pairs])
    agg[f"{prefix}_cpu_ratio"] = median([_ratio(o.get("proxy_cpu_ms"), r.get("proxy_cpu_ms"))
                                         for r, o in pairs])
    if stream:
        agg[f"{prefix}_ttft_added_ms"] = median(
            [r["ttft_p50_ms"] - o["ttft_p50_ms"] for r, o in pairs
             if r.get("ttft_p50_ms") is not None and o.get("ttft_p50_ms") is not None])


def aggregate(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over repetitions; ratios against the direct (and peer) run of the same repetition."""
    table: dict[str, dict[str, Any]] = {}
    for name, rows in results.items():
        sc_key, c, stream = name.split("|")
        agg: dict[str, Any] = {"reps": len(rows)}
        for metric in METRICS:
            agg[metric] = median([r.get(metric) for r in rows])
        agg["p50_range"] = (min(r["p50_ms"] for r in rows), max(r["p50_ms"] for r in rows))
        agg["errors"] = sum(sum(r["errors"].values()) for r in rows)
        settles = [r["settle_s"] for r in rows if "settle_s" in r]
        agg["settle_max_s"] = max(settles) if settles else None
        agg["cache_errors_total"] = sum(r.get("cache_errors") or 0 for r in rows)
        agg["answers"] = dict(sum((Counter(r["semcache"]) for r in rows), Counter()))
        agg["non_200"] = sum(v for r in rows for k, v in r["status"].items() if k != "200")
        direct = results.get(f"{'direct-stream' if stream == 'True' else 'direct'}|{c}|{stream}", [])
        if direct and sc_key not in ("direct", "direct-stream"):
            _paired(agg, "direct", list(zip(rows, direct, strict=False)), stream == "True")
        peer = results.get(f"{PEER_OF.get(sc_key, '-')}|{c}|{stream}", [])
        if peer:
            _paired(agg, "peer", list(zip(rows, peer, strict=False)), stream == "True")
        goal = GOALS.get((sc_key, int(c)))
        if goal is not None:
            agg["goal"] = goal.text
            agg["goal_met"] = goal.met(agg.get(goal.metric))
        table[name] = agg
    return table


def _share(agg: dict[str, Any]) -> str:
    return f"{fmt(100 * agg['hit_share'] if agg['hit_share'] is not None else None, 1)}%"


def _met(agg: dict[str, Any]) -> str:
    return {True: "yes", False: "**no**", None: ""}[agg.get("goal_met")]


def _plain_rows(table: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    lines = ["### Non-streaming (medians over repetitions; ratios vs direct in the same repetition)", "",
             "| scenario | c | req/s | p50 ms | p99 ms | proxy CPU ms/req | proxy peak RSS MiB "
             "| direct req/s | direct p50 ms | direct p99 ms | added p50 ms | req/s vs direct "
             "| share as expected | goal | met |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, agg in table.items():
        if name.endswith("True"):
            continue
        c = name.split("|")[1]
        lines.append(
            f"| {labels[name]} | {c} | {fmt(agg['rps'], 0)} | {fmt(agg['p50_ms'])} | {fmt(agg['p99_ms'])} "
            f"| {fmt(agg['proxy_cpu_ms'])} | {fmt(agg['proxy_peak_rss_mib'], 0)} "
            f"| {fmt(agg.get('direct_rps'), 0)} | {fmt(agg.get('direct_p50_ms'))} "
            f"| {fmt(agg.get('direct_p99_ms'))} | {fmt(agg.get('direct_p50_added_ms'))} "
            f"| {fmt(agg.get('direct_rps_ratio'))} | {_share(agg)} | {agg.get('goal', '')} | {_met(agg)} |")
    return lines


def _stream_rows(table: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    lines = ["### Streaming (TTFB = first body byte; TTFT = first SSE event with a content delta)", "",
             "| scenario | c | req/s | TTFB p50 ms | TTFT p50 ms | TTFT p99 ms | total p50 ms "
             "| proxy CPU ms/req | direct TTFT p50 ms | added TTFT p50 ms | req/s vs direct "
             "| share as expected | goal | met |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, agg in table.items():
        if not name.endswith("True"):
            continue
        c = name.split("|")[1]
        lines.append(
            f"| {labels[name]} | {c} | {fmt(agg['rps'], 0)} | {fmt(agg['ttfb_p50_ms'])} "
            f"| {fmt(agg['ttft_p50_ms'])} | {fmt(agg['ttft_p99_ms'])} | {fmt(agg['p50_ms'])} "
            f"| {fmt(agg['proxy_cpu_ms'])} | {fmt(agg.get('direct_ttft_p50_ms'))} "
            f"| {fmt(agg.get('direct_ttft_added_ms'))} | {fmt(agg.get('direct_rps_ratio'))} "
            f"| {_share(agg)} | {agg.get('goal', '')} | {_met(agg)} |")
    return lines


def _peer_rows(table: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    rows = [(name, agg) for name, agg in table.items() if agg.get("peer_rps") is not None]
    if not rows:
        return []
    lines = ["", "### Against the peer: this proxy vs LiteLLM's proxy, same workload, same repetition", "",
             "| scenario | c | stream | CPU ms/req ours | CPU ms/req LiteLLM | LiteLLM CPU / ours "
             "| req/s ours | req/s LiteLLM | req/s ours / LiteLLM | p50 ms ours | p50 ms LiteLLM "
             "| TTFT p50 ms ours | TTFT p50 ms LiteLLM | peak RSS MiB ours | peak RSS MiB LiteLLM |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, agg in rows:
        _, c, stream = name.split("|")
        lines.append(
            f"| {labels[name]} | {c} | {'yes' if stream == 'True' else 'no'} | {fmt(agg['proxy_cpu_ms'])} "
            f"| {fmt(agg['peer_proxy_cpu_ms'])} | {fmt(agg['peer_cpu_ratio'], 1)} | {fmt(agg['rps'], 0)} "
            f"| {fmt(agg['peer_rps'], 0)} | {fmt(agg['peer_rps_ratio'], 1)} | {fmt(agg['p50_ms'])} "
            f"| {fmt(agg['peer_p50_ms'])} | {fmt(agg['ttft_p50_ms'])} | {fmt(agg['peer_ttft_p50_ms'])} "
            f"| {fmt(agg['proxy_peak_rss_mib'], 0)} | {fmt(agg['peer_proxy_peak_rss_mib'], 0)} |")
    return lines


def _cpu_rows(table: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    lines = ["", "### CPU per request of every process (ms, medians)", "",
             "| scenario | c | stream | proxy | upstream | client | p50 range over reps (ms) | errors "
             "| non-200 | longest wait for idle before a run (s) |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, agg in table.items():
        _, c, stream = name.split("|")
        low, high = agg["p50_range"]
        lines.append(f"| {labels[name]} | {c} | {'yes' if stream == 'True' else 'no'} "
                     f"| {fmt(agg['proxy_cpu_ms'])} | {fmt(agg['upstream_cpu_ms'])} "
                     f"| {fmt(agg['client_cpu_ms'])} | {low:.2f}-{high:.2f} | {agg['errors']} "
                     f"| {agg['non_200']} | {fmt(agg['settle_max_s'], 1)} |")
    return lines


def _cache_rows(table: dict[str, dict[str, Any]], labels: dict[str, str]) -> list[str]:
    lines = ["", "### Cache-on runs: answers by x-semcache, embedding batches, lookup faults", "",
             "| scenario | c | stream | x-semcache answers (all reps) | mean embedding batch "
             "| lookup faults, all reps (timeouts -> miss) | median similarity |",
             "|---|---:|---|---|---:|---:|---:|"]
    for name, agg in table.items():
        if agg.get("embed_batch_mean") is None and agg.get("cache_errors") is None:
            continue
        _, c, stream = name.split("|")
        answers = ", ".join(f"{k} {v}" for k, v in sorted(agg["answers"].items()))
        lines.append(f"| {labels[name]} | {c} | {'yes' if stream == 'True' else 'no'} | {answers} "
                     f"| {fmt(agg['embed_batch_mean'], 1)} | {agg['cache_errors_total']:.0f} "
                     f"| {fmt(agg['similarity_p50'], 4)} |")
    return lines


def markdown(table: dict[str, dict[str, Any]], labels: dict[str, str], machine: dict[str, Any],
             notes: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Machine: {machine['cpu']}, nproc {machine['nproc']}, Python {machine['python']}, "
             f"aiohttp {machine['aiohttp']}, load average at start {machine['loadavg']}, "
             f"at end {machine.get('loadavg_end', '?')}", "",
             f"Proxy code: {machine['code']}", ""]
    if machine.get("proxy_status"):
        lines += ["`git status --short proxy` at the start:", "", "```", machine["proxy_status"], "```", ""]
    if notes.get("peer"):
        lines += [f"Peer: {notes['peer']}", ""]
    lines += [*_plain_rows(table, labels), "", *_stream_rows(table, labels), *_peer_rows(table, labels),
              *_cpu_rows(table, labels), *_cache_rows(table, labels)]
    seeded = notes.get("semantic_seeded", {})
    peer_start = "".join(f"{name} ready in {notes[f'{name}_start_s']} s at {notes[f'{name}_idle_rss_mib']} "
                         "MiB RSS (process tree). " for name in ("peer_off", "peer_on")
                         if f"{name}_start_s" in notes)
    lines += ["", f"Start-up: cache-off proxy ready in {notes.get('proxy_off_start_s')} s at "
              f"{notes.get('proxy_off_idle_rss_mib')} MiB RSS; cache-on proxy (model loaded) in "
              f"{notes.get('proxy_on_start_s')} s at {notes.get('proxy_on_idle_rss_mib')} MiB RSS. "
              + peer_start
              + "".join(f"Semantic seeding {tenant}: {v['stored']} of {v['sent']} questions stored "
                        f"in {v['seconds']} s. " for tenant, v in seeded.items())
              + f"Whole run {notes.get('elapsed_s')} s."]
    return "\n".join(lines)


def print_profile(profile: dict[str, Any]) -> None:
    for key, found in profile.items():
        print(f"\n### py-spy: {key} ({found['samples']} samples, flamegraph {found['svg']})\n")
        print("| self % | function | | inclusive % | function |\n|---:|---|---|---:|---|")
        for (f1, s1), (f2, s2) in zip(found["self"], found["inclusive"], strict=False):
            print(f"| {s1} | `{f1}` | | {s2} | `{f2}` |")


def _git(*argv: str) -> str:
    try:
        # rstrip only: `git status --short` lines start with a meaningful space
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.rstrip()
    except OSError:
        return ""


def code_version() -> str:
    """HEAD, plus a hash of the proxy sources when they differ from it (others edit proxy/)."""
    import hashlib

    head = _git("rev-parse", "--short", "HEAD").strip() or "unknown"
    if not _git("status", "--porcelain", "--", "proxy"):
        return head
    digest = hashlib.sha256()
    for path in sorted((ROOT / "proxy").rglob("*.py")):
        digest.update(path.read_bytes())
    return f"{head} + uncommitted proxy/ changes (sources sha256 {digest.hexdigest()[:12]})"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import aiohttp
    return {"cpu": cpu, "code": code_version(), "proxy_status": _git("status", "--short", "--", "proxy"),
            "nproc": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "aiohttp": aiohttp.__version__, "kernel": platform.release(),
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg())}
