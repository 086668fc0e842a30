"""The benchmark harness's own logic: time to first token, pairing with the direct and peer runs,
process-tree CPU. (The benchmark itself is run by hand or `make bench`, never as a test.)"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.bench_report import aggregate
from bench.loadgen import has_content
from bench.procs import Service


def _event(delta: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode()


@pytest.mark.parametrize(("events", "expected"), [
    ([_event({"role": "assistant"})], False),                       # a role-only first chunk
    ([_event({"role": "assistant", "content": ""})], False),
    ([_event({"role": "assistant"}), _event({"content": "Hi"})], True),
    ([_event({"reasoning_content": "hm"})], True),
    ([b": keep-alive", b"data: [DONE]"], False),
    ([b"data: {not json"], False),
    ([b'data: {"choices": []}'], False),
    ([_event({"content": "x"}).replace(b"data: ", b"data:")], True),  # no space after the colon
])
def test_first_token_is_the_first_content_delta(events: list[bytes], expected: bool) -> None:
    assert has_content(b"\n\n".join(events)) is expected


def _row(rps: float, p50: float, cpu: float | None, ttft: float | None = None) -> dict[str, Any]:
    return {"rps": rps, "p50_ms": p50, "p99_ms": p50 * 2, "ttfb_p50_ms": ttft, "ttft_p50_ms": ttft,
            "proxy_cpu_ms": cpu, "hit_share": 1.0, "errors": {}, "status": {"200": 10},
            "semcache": {"exact": 10}}


def test_ratios_are_taken_per_repetition_against_the_direct_and_the_peer_run() -> None:
    results = {
        "direct|32|False": [_row(1000, 1.0, None), _row(500, 2.0, None)],
        "exact-hit|32|False": [_row(800, 1.5, 0.2), _row(300, 3.0, 0.5)],
        "peer-exact-hit|32|False": [_row(80, 15.0, 8.0), _row(20, 30.0, 8.0)],
    }
    table = aggregate(results)
    ours = table["exact-hit|32|False"]
    # per repetition: 800/1000 = 0.8 and 300/500 = 0.6, median 0.7 (not 550/750)
    assert ours["direct_rps_ratio"] == pytest.approx(0.7)
    assert ours["direct_p50_added_ms"] == pytest.approx(0.75)
    assert ours["peer_cpu_ratio"] == pytest.approx((40 + 16) / 2)
    assert ours["peer_rps_ratio"] == pytest.approx((10 + 15) / 2)
    assert ours["proxy_cpu_ms"] == pytest.approx(0.35)
    assert ours["goal_met"] is False            # CPU <= 0.3 ms per exact hit
    assert "peer_rps" not in table["peer-exact-hit|32|False"]


def test_streamed_rows_pair_with_the_streamed_direct_run_and_judge_ttft() -> None:
    results = {
        "direct-stream|1|True": [_row(1000, 1.0, None, ttft=0.5)],
        "exact-stream-hit|1|True": [_row(900, 1.2, 0.4, ttft=0.9)],
    }
    row = aggregate(results)["exact-stream-hit|1|True"]
    assert row["direct_ttft_added_ms"] == pytest.approx(0.4)
    assert row["goal"] == "TTFT <= 5 ms" and row["goal_met"] is True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_process_tree_cpu_counts_the_children(tmp_path: Path) -> None:
    # a parent that idles while its child burns CPU: only the tree counts the child's time
    burn = "import time\nt = time.time()\nwhile time.time() - t < 20: pass"
    code = (f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {burn!r}])\n"
            "time.sleep(20)\n")
    argv = [sys.executable, "-c", code]
    alone, tree = Service("alone", argv, tmp_path, env=dict(os.environ)), None
    try:
        tree = Service("tree", argv, tmp_path, env=dict(os.environ), tree=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and tree.cpu_s() < 0.5:
            time.sleep(0.1)
        assert len(tree.pids()) == 2
        assert tree.cpu_s() >= 0.5
        assert alone.cpu_s() < 0.3
    finally:
        for svc in (alone, tree):
            if svc is not None:
                os.killpg(svc.pid, signal.SIGKILL)  # its own session: the parent and its child
                svc.stop()
