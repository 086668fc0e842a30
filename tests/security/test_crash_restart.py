"""Invariant 8 (lifecycle) and 3 (only complete answers are cached) where a process dies or a
client leaves: SIGKILL during snapshot writes never leaves a snapshot that loads wrong (atomic
writes: the old or the new one, whole), a restarted proxy never serves a wrong hit, start-up
succeeds with the backend or Redis down (readiness says so), and a stream the client abandons is
not stored. SIGTERM drains: tests/integration/test_lifecycle.py.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from proxy.embedding import SentenceEmbedder
from proxy.store.memory import SNAPSHOT_NAME, MemoryStore, read_snapshot
from tests.redis_server import ProxyProcess, RedisServer, free_port
from tests.security.conftest import TaggingUpstream, backend

REPO = Path(__file__).resolve().parents[2]

# A writer process: a MemoryStore full of entries whose answers name their key, snapshotted over
# and over (each snapshot ~10 MB, so a SIGKILL at a random moment often lands inside a write).
WRITER = textwrap.dedent("""
    import asyncio, sys
    import numpy as np
    from proxy.clock import SystemClock
    from proxy.ports import Entry
    from proxy.store.memory import MemoryStore

    async def main(data_dir, round_):
        store = MemoryStore(max_entries=100_000, max_bytes=1 << 30, clock=SystemClock(),
                            data_dir=data_dir, snapshot_interval_s=3600)
        await store.start()
        rng = np.random.default_rng(round_)
        n = 0
        while True:
            for _ in range(500):
                key = f"{round_}-{n}"
                vector = rng.standard_normal(384).astype(np.float32)
                vector /= np.linalg.norm(vector)
                await store.put(Entry(key=key, scope="s", model="m", route="chat", text=key,
                                      vector=vector, created=0.0, expires=4e9,
                                      response={"answer": "for " + key, "pad": "x" * 512}))
                n += 1
            await store.save_snapshot()
            print("saved", n, flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
""")


def check_snapshot(path: Path) -> int:
    """The snapshot loads and every entry's answer belongs to its key; how many entries."""
    entries, dropped = read_snapshot(path, None, time.time())
    assert dropped == 0
    for entry in entries:
        assert entry.response["answer"] == "for " + entry.key
        assert entry.text == entry.key
    return len(entries)


def test_sigkill_during_snapshot_writes_never_leaves_a_bad_snapshot(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1)
    sizes: list[int] = []
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(round_)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        try:
            assert proc.stdout is not None
            proc.stdout.readline()            # one snapshot written, the next one under way
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        snapshot = tmp_path / SNAPSHOT_NAME
        assert snapshot.exists()
        sizes.append(check_snapshot(snapshot))
        assert not (tmp_path / (SNAPSHOT_NAME + ".corrupt")).exists()
    # each round starts from the last snapshot and adds to it: nothing went backwards or missing
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0], sizes


def test_a_corrupt_snapshot_is_moved_aside_and_the_store_starts_empty(tmp_path: Path) -> None:
    import asyncio

    from proxy.clock import SystemClock

    (tmp_path / SNAPSHOT_NAME).write_bytes(b"SEMCACHE" + os.urandom(4096))
    store = MemoryStore(max_entries=10, max_bytes=1 << 20, clock=SystemClock(), data_dir=tmp_path)

    async def start_and_count() -> int:
        await store.start()
        count = len(store)
        await store.close()
        return count

    assert asyncio.run(start_and_count()) == 0
    assert (tmp_path / (SNAPSHOT_NAME + ".corrupt")).exists()


def test_temp_files_of_killed_writes_are_cleaned_up_on_start(tmp_path: Path) -> None:
    import asyncio

    from proxy.clock import SystemClock

    stale = tmp_path / f".{SNAPSHOT_NAME}.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    store = MemoryStore(max_entries=10, max_bytes=1 << 20, clock=SystemClock(), data_dir=tmp_path)

    async def cycle() -> None:
        await store.start()
        await store.close()

    asyncio.run(cycle())
    assert not stale.exists()


# -- a real proxy, killed while it snapshots, restarted -----------------------------------------

ANSWER = re.compile(r"^\[\w+\] Answer to: (.*?) \| ")


def crash_config(upstream_url: str, models_dir: str, data_dir: Path) -> dict[str, Any]:
    return {"server": {"host": "127.0.0.1", "admin_token_env": None, "drain_timeout_s": 5},
            "backends": backend(upstream_url),
            "embedding": {"cache_dir": models_dir},
            "cache": {"threshold": 0.99},
            "store": {"data_dir": str(data_dir), "snapshot_interval_s": 0.05},
            "routing": {"health_interval_s": 0}}


def question(i: int) -> str:
    return f"Crash test question number {i}: what is {i} plus {i * 7}?"


def ask(url: str, text: str) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", timeout=30,
                         headers={"Authorization": "Bearer sk-crash", "User-Agent": "crash"},
                         json={"model": "deepseek-chat", "messages": [{"role": "user", "content": text}]})


def crash_cycles(kills: int, upstream: tuple[TaggingUpstream, str], models_dir: str, root: Path) -> None:
    _, upstream_url = upstream
    proxy = ProxyProcess("crash", root, crash_config(upstream_url, models_dir, root / "data"))
    rng = random.Random(kills)
    asked: list[int] = []
    next_q = 0
    try:
        for cycle in range(kills + 1):
            proxy.start()
            # every answer it serves, before any new question, must be the one asked for
            wrong = []
            for i in asked:
                resp = ask(proxy.url, question(i))
                assert resp.status_code == 200, resp.text
                match = ANSWER.match(resp.json()["choices"][0]["message"]["content"])
                assert match is not None
                if match.group(1) != question(i):
                    wrong.append((i, resp.headers["x-semcache"], match.group(1)))
            assert not wrong, wrong
            if cycle == kills:
                break
            # new answers arrive while the store snapshots every 50 ms; SIGKILL at a random moment
            stop = time.monotonic() + rng.uniform(0.5, 1.5)
            while time.monotonic() < stop:
                assert ask(proxy.url, question(next_q)).status_code == 200
                asked.append(next_q)
                next_q += 1
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGKILL)
            proxy.proc.wait(10)
            snapshot = root / "data" / SNAPSHOT_NAME
            if snapshot.exists():
                entries, _ = read_snapshot(snapshot, None, time.time())
                for entry in entries:
                    text = entry.text or ""
                    assert entry.response["choices"][0]["message"]["content"].startswith(
                        f"[crash] Answer to: {text}"), entry.key
        corrupt = list((root / "data").glob("*.corrupt"))
        assert not corrupt, corrupt
        stats = requests.get(proxy.url + "/admin/cache/stats", timeout=10).json()
        assert stats["entries"] > 0   # positive control: snapshots did survive the kills
    finally:
        proxy.stop()


@pytest.fixture
def models_dir(embedder: SentenceEmbedder) -> str:
    return os.environ.get("SEMCACHE_TEST_MODEL_CACHE") or str(embedder._config.cache_dir)


def test_sigkill_then_restart_never_serves_a_wrong_hit(tagging_upstream: tuple[TaggingUpstream, str],
                                                       models_dir: str, tmp_path: Path) -> None:
    crash_cycles(1, tagging_upstream, models_dir, tmp_path)


@pytest.mark.slow
def test_sigkill_then_restart_many_times(tagging_upstream: tuple[TaggingUpstream, str], models_dir: str,
                                         tmp_path: Path) -> None:
    crash_cycles(6, tagging_upstream, models_dir, tmp_path)


# -- start-up with dependencies down ---------------------------------------------------------------


def test_start_up_with_the_backend_down_is_ready_and_says_so(make_proxy: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    url = make_proxy(backends=backend(dead, retries=0), routing={"health_interval_s": 0.2})
    deadline = time.monotonic() + 10
    while True:
        ready = requests.get(url + "/readyz", timeout=5)
        if ready.json().get("backend.fake.health") == "failing":
            break
        assert time.monotonic() < deadline, ready.json()
        time.sleep(0.1)
    # ready: cached answers still flow; the backend's state is in the notes
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    resp = requests.post(url + "/v1/chat/completions", timeout=10,
                         json={"model": "m", "messages": [{"role": "user", "content": "anyone?"}]})
    assert resp.status_code in (502, 503)
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_start_up_with_redis_down_is_ready_and_says_so(make_proxy: Any, tmp_path: Path) -> None:
    port = free_port()
    url = make_proxy(store={"type": "redis", "redis_url": f"redis://127.0.0.1:{port}/0",
                            "namespace": "down", "startup_sync_timeout_s": 0.5})
    # the very first answer already says Redis is away (its breaker has seen no call yet and
    # would read "closed"), and the proxy is ready: a cache that is down is a miss, not an error
    ready = requests.get(url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["cache.redis"] == "unreachable", ready.json()
    deadline = time.monotonic() + 10
    for i in range(1000):
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": f"redis down {i}?"}]}
        resp = requests.post(url + "/v1/chat/completions", timeout=30, json=body)
        assert resp.status_code == 200 and resp.headers["x-semcache"] in ("miss", "bypass")
        state = requests.get(url + "/readyz", timeout=10).json()
        assert state["cache.redis"] != "closed", state     # never claimed healthy while down
        if state["cache.redis"] == "open":                 # failed calls opened the breaker
            break
        assert time.monotonic() < deadline, state
    # Redis arrives: without any request the follower reaches it and the note follows
    redis = RedisServer(tmp_path / "redis", port=port).start()
    try:
        deadline = time.monotonic() + 20
        while (state := requests.get(url + "/readyz", timeout=10).json())["cache.index"] != "following":
            assert time.monotonic() < deadline, state
            time.sleep(0.1)
        assert state["cache.redis"] in ("closed", "open", "half_open"), state
        assert state["cache.redis"] != "unreachable"
    finally:
        redis.kill()


def test_start_up_with_redis_up_reads_closed_at_once(make_proxy: Any, redis_url: str) -> None:
    url = make_proxy(store={"type": "redis", "redis_url": redis_url, "namespace": "up-at-start"})
    state = requests.get(url + "/readyz", timeout=10).json()
    assert state["cache.redis"] == "closed" and state["cache.index"] == "following", state


# -- a stream the client abandons is not stored --------------------------------------------------


def test_stream_abandoned_mid_way_is_not_stored(make_proxy: Any,
                                                tagging_upstream: tuple[TaggingUpstream, str]) -> None:
    fake, upstream_url = tagging_upstream
    fake.chunk_delay_s = 0.05
    url = make_proxy(backends=backend(upstream_url))
    text = "Tell me a story I will not finish reading."
    body: dict[str, Any] = {"model": "deepseek-chat", "stream": True,
                            "messages": [{"role": "user", "content": text}]}
    headers = {"Authorization": "Bearer sk-leaver", "User-Agent": "leaver"}
    with requests.post(url + "/v1/chat/completions", json=body, headers=headers, stream=True,
                       timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith(b"data: ") for line in got)
    # the client is gone; the upstream call is cancelled (nobody is left to read it)
    deadline = time.monotonic() + 10
    while fake.aborted == 0:
        assert time.monotonic() < deadline, "the upstream call kept running"
        time.sleep(0.05)
    fake.chunk_delay_s = 0
    time.sleep(0.2)
    stats = requests.get(url + "/admin/cache/stats", timeout=10).json()
    assert stats["entries"] == 0
    again = requests.post(url + "/v1/chat/completions", json={**body, "stream": False}, headers=headers,
                          timeout=30)
    assert again.headers["x-semcache"] == "miss"
    assert orjson.loads(again.content)["choices"][0]["message"]["content"].startswith("[leaver]")
