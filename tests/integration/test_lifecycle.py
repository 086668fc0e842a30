"""The proxy as an operator runs it: ``python -m proxy serve --config <yaml>`` in its own process,
driven by signals (SIGHUP reload, SIGTERM drain) and the ``python -m proxy cache`` command line.

Starting a proxy process costs ~10 s (importing sentence-transformers and loading the model), so
the tests share one process at a time through the module-scoped ``lab``: a test that needs a
process takes the running one (or starts one), and a test that stops it leaves the next start to
whoever needs it. Each test uses its own tenants, so what others cached never decides its result.
The exported ONNX model lives in the session's model folder, so no process exports it again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import FakeUpstream
from proxy.app import Overrides, Server, build_app
from proxy.config import Config
from proxy.embedding import SentenceEmbedder
from tests.conftest import ServerLoop

REPO = Path(__file__).resolve().parents[2]
MODEL = "deepseek-chat"
CAPITAL = "What is the capital city of France?"
CAPITAL_CLOSE = "Which city is the capital of France?"      # 0.972 to CAPITAL with MiniLM
CAPITAL_PARA = "France's capital is which city?"            # 0.921 to CAPITAL
SPIDER = "How many legs does a spider have?"
SPIDER_PARA = "How many legs do spiders have?"              # 0.967 to SPIDER
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def new_key() -> str:
    """A client key of its own, hence a tenant (and cache scope) of its own."""
    return f"sk-{uuid.uuid4().hex[:12]}"


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    url: str

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Lab:
    """One config file and data dir; at most one proxy process at a time."""

    root: Path
    upstream_url: str
    models_dir: str
    threshold: float = 0.99
    current: Proxy | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.root / "proxy.yaml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.logs[-1]

    def write_config(self, *, threshold: float | None = None, port: int | None = None,
                     text: str | None = None) -> None:
        if text is not None:
            self.config_path.write_text(text)
            return
        if threshold is not None:
            self.threshold = threshold
        if port is None and self.current is not None:
            port = int(self.current.url.rsplit(":", 1)[1])
        config = {
            "server": {"host": "127.0.0.1", "port": port or 0, "drain_timeout_s": 10,
                       "admin_token_env": None, "log_level": "INFO"},
            "backends": [{"name": "fake", "base_url": self.upstream_url, "api_key_env": None}],
            "embedding": {"cache_dir": self.models_dir},
            "cache": {"threshold": self.threshold},
            "store": {"data_dir": str(self.data_dir)},
        }
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self) -> Proxy:
        assert self.current is None or not self.current.alive()
        port = free_port()
        self.write_config(port=port)
        self.starts += 1
        log = self.root / f"proxy{self.starts}.log"
        self.logs.append(log)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("SEMCACHE_ADMIN_TOKEN", None)
        with log.open("wb") as out:
            command = [sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path)]
            proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        proxy = Proxy(proc, f"http://127.0.0.1:{port}")
        self.current = proxy
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proxy.alive(), f"proxy exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"proxy not ready:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(proxy.url + "/readyz", timeout=2).status_code == 200:
                    return proxy
            except requests.ConnectionError:
                pass
            time.sleep(0.1)

    def running(self) -> Proxy:
        if self.current is not None and self.current.alive():
            return self.current
        return self.start()

    def stop(self, timeout: float = 30) -> int:
        assert self.current is not None
        self.current.proc.send_signal(signal.SIGTERM)
        return self.current.proc.wait(timeout)

    def log_count(self, needle: str) -> int:
        return self.log_path.read_text(errors="replace").count(needle)

    def reload(self, expect: str) -> None:
        """SIGHUP the running proxy and wait until its log says ``expect`` once more."""
        assert self.current is not None
        before = self.log_count(expect)
        self.current.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while self.log_count(expect) <= before:
            assert time.monotonic() < deadline, f"no {expect!r} in the log:\n{self.log_path.read_text()}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def lab(upstream: tuple[FakeUpstream, str], embedder: SentenceEmbedder,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    # the session's embedder has exported the ONNX model already: processes load that copy
    models_dir = os.environ.get("SEMCACHE_TEST_MODEL_CACHE") or embedder._config.cache_dir
    the_lab = Lab(root=tmp_path_factory.mktemp("lifecycle"), upstream_url=upstream[1],
                  models_dir=str(models_dir))
    yield the_lab
    if the_lab.current is not None and the_lab.current.alive():
        the_lab.current.proc.send_signal(signal.SIGTERM)
        try:
            the_lab.current.proc.wait(30)
        except subprocess.TimeoutExpired:
            the_lab.current.proc.kill()
            the_lab.current.proc.wait(10)


@pytest.fixture
def slow_stream(upstream: tuple[FakeUpstream, str]) -> Iterator[None]:
    """Make the fake upstream's streams last about a second."""
    fake, _ = upstream
    saved = fake.chunk_delay_s
    fake.chunk_delay_s = 0.07
    yield
    fake.chunk_delay_s = saved


def ask(url: str, question: str, key: str, **body: Any) -> requests.Response:
    resp = requests.post(url + "/v1/chat/completions", timeout=30,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": MODEL, "messages": [{"role": "user", "content": question}], **body})
    assert resp.status_code == 200, resp.text[:300]
    return resp


def state(resp: requests.Response) -> str:
    return resp.headers.get("x-semcache", "")


def answer(resp: requests.Response) -> str:
    return str(resp.json()["choices"][0]["message"]["content"])


def stores_attempted(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "semcache_cache_store_total")


def wait_for_stores(url: str, count: float, timeout: float = 10.0) -> None:
    """Answers are stored in the background after they are sent; wait until ``count`` were."""
    deadline = time.monotonic() + timeout
    while stores_attempted(url) < count:
        assert time.monotonic() < deadline, "the answers were not stored in time"
        time.sleep(0.02)


def cli(*args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "proxy", "cache", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class StreamReader(threading.Thread):
    """Reads one streamed answer in the background, keeping each SSE line with its arrival time."""

    def __init__(self, url: str, question: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.question, self.key = url, question, key
        self.lines: list[tuple[float, bytes]] = []
        self.first = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with requests.post(self.url + "/v1/chat/completions", stream=True, timeout=30,
                               headers={"Authorization": f"Bearer {self.key}"},
                               json={"model": MODEL, "stream": True,
                                     "messages": [{"role": "user", "content": self.question}]}) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line.startswith(b"data: "):
                        self.lines.append((time.monotonic(), line))
                        self.first.set()
        except BaseException as exc:  # handed to the test thread
            self.error = exc
        finally:
            self.first.set()

    def text(self) -> tuple[str, str | None]:
        """The content and finish_reason the stream carried (before [DONE])."""
        parts, finish = [], None
        for _, line in self.lines[:-1]:
            chunk = orjson.loads(line.removeprefix(b"data: "))
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                parts.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
        return "".join(parts), finish


def poll_readiness(url: str) -> int | str:
    try:
        return requests.get(url + "/readyz", timeout=1).status_code
    except requests.ConnectionError:
        return "refused"


# -- 5. health and readiness --------------------------------------------------------------------


def test_healthz_and_readyz_once_ready(lab: Lab) -> None:
    proxy = lab.running()
    health = requests.get(proxy.url + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = requests.get(proxy.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# -- 4. cache stats / flush from the command line -----------------------------------------------


def test_cli_cache_stats_and_flush(lab: Lab) -> None:
    proxy = lab.running()
    key = new_key()
    stored = stores_attempted(proxy.url)
    ask(proxy.url, "What does the cache command line print?", key)
    ask(proxy.url, "How is the cache flushed from the shell?", key)
    wait_for_stores(proxy.url, stored + 2)

    stats = cli("stats", "--url", proxy.url)
    assert stats["enabled"] is True
    assert stats["entries"] >= 2 and stats["bytes"] > 0
    assert stats["max_entries"] > 0 and stats["max_bytes"] > 0

    flushed = cli("flush", "--url", proxy.url)
    assert flushed == {"flushed": stats["entries"]}
    after = cli("stats", "--url", proxy.url)
    assert after["entries"] == 0 and after["bytes"] == 0

    # flushed means forgotten: the same question goes to the upstream again
    assert state(ask(proxy.url, "What does the cache command line print?", key)) == "miss"


# -- 2. SIGHUP reload ---------------------------------------------------------------------------


def test_sighup_reloads_threshold_and_keeps_config_on_bad_yaml(lab: Lab) -> None:
    proxy = lab.running()
    starts = lab.starts
    lab.write_config(threshold=0.99)
    lab.reload("config reloaded")
    before, after, late = new_key(), new_key(), new_key()
    stored = stores_attempted(proxy.url)
    for key in (before, after, late):
        assert state(ask(proxy.url, CAPITAL, key)) == "miss"
    wait_for_stores(proxy.url, stored + 3)

    # 0.972 is under 0.99: a miss
    assert state(ask(proxy.url, CAPITAL_CLOSE, before)) == "miss"

    lab.write_config(threshold=0.90)
    lab.reload("config reloaded")
    hit = ask(proxy.url, CAPITAL_CLOSE, after)  # the same paraphrase, in a scope just like before's
    assert state(hit) == "semantic"
    assert 0.9 <= float(hit.headers["x-semcache-similarity"]) < 0.99
    assert CAPITAL in answer(hit)
    assert proxy.alive() and lab.current is proxy

    # broken YAML, then a value out of range: both refused, the running config (0.90) stays
    lab.write_config(text="cache: {threshold: [0.5\n")
    lab.reload("config reload failed")
    lab.write_config(text="cache:\n  threshold: 2.0\n")
    lab.reload("config reload failed")
    assert proxy.alive()
    assert requests.get(proxy.url + "/readyz", timeout=10).status_code == 200
    kept = ask(proxy.url, CAPITAL_PARA, late)  # 0.921: a hit only while 0.90 is in force
    assert state(kept) == "semantic"
    assert lab.starts == starts and lab.current is proxy  # no restart: the same process all along
    lab.write_config(threshold=0.90)


# -- 1. persistence across a restart ------------------------------------------------------------


def test_cache_survives_a_restart(lab: Lab, upstream: tuple[FakeUpstream, str]) -> None:
    fake, _ = upstream
    proxy = lab.running()
    key = new_key()
    streamed = "Which planet is known as the red planet?"
    stored = stores_attempted(proxy.url)
    original = ask(proxy.url, SPIDER, key)
    assert state(original) == "miss"
    reader = StreamReader(proxy.url, streamed, key)
    reader.run()
    assert reader.error is None and reader.lines[-1][1] == b"data: [DONE]"
    wait_for_stores(proxy.url, stored + 2)

    # SIGTERM comes while one more stream is in flight: it is finished, stored and kept as well
    lab.write_config(threshold=0.90)
    saved, fake.chunk_delay_s = fake.chunk_delay_s, 0.05
    try:
        drained = StreamReader(proxy.url, "Why do leaves change colour in autumn?", key)
        drained.start()
        assert drained.first.wait(10) and drained.error is None
        assert lab.stop() == 0
    finally:
        fake.chunk_delay_s = saved
    drained.join()
    assert drained.error is None and drained.lines[-1][1] == b"data: [DONE]"

    restarted = lab.start()
    assert restarted.proc.pid != proxy.proc.pid
    assert requests.get(restarted.url + "/admin/cache/stats", timeout=10).json()["entries"] >= 3

    calls = fake.calls
    exact = ask(restarted.url, SPIDER, key)
    assert state(exact) == "exact" and answer(exact) == answer(original)
    semantic = ask(restarted.url, SPIDER_PARA, key)  # the index was rebuilt from the snapshot
    assert state(semantic) == "semantic" and answer(semantic) == answer(original)
    streamed_again = ask(restarted.url, streamed, key)
    assert state(streamed_again) == "exact"
    assert answer(streamed_again) == reader.text()[0]
    after_drain = ask(restarted.url, "Why do leaves change colour in autumn?", key)
    assert state(after_drain) == "exact" and answer(after_drain) == drained.text()[0]
    assert fake.calls == calls
    # (the exact hits above also show the tenant key survived); another client sees none of it
    assert state(ask(restarted.url, SPIDER, new_key())) == "miss"


# -- 3. SIGTERM drains what is in flight --------------------------------------------------------


@pytest.mark.usefixtures("slow_stream")
def test_sigterm_lets_a_stream_in_flight_finish_and_exits_0(lab: Lab) -> None:
    proxy = lab.running()
    question = "Tell me a long story about draining."
    reader = StreamReader(proxy.url, question, new_key())
    reader.start()
    assert reader.first.wait(10) and reader.error is None

    signalled = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    readiness = []
    while reader.is_alive():
        readiness.append(poll_readiness(proxy.url))
        time.sleep(0.05)
    reader.join()

    assert reader.error is None, reader.error
    assert reader.lines[-1][1] == b"data: [DONE]"
    text, finish = reader.text()
    assert question in text and finish == "stop"
    assert reader.lines[-1][0] - signalled > 0.3  # it really was in flight during the drain
    assert proxy.proc.wait(30) == 0
    # once readiness is off it stays off (a 200 after the first non-200 would invite traffic)
    assert readiness, "the stream ended before readiness could be probed"
    off = next((i for i, r in enumerate(readiness) if r != 200), len(readiness))
    assert off < len(readiness) and 200 not in readiness[off:], readiness


@pytest.mark.usefixtures("slow_stream")
def test_readyz_answers_503_while_draining(servers: ServerLoop, upstream: tuple[FakeUpstream, str],
                                           embedder: SentenceEmbedder, tmp_path: Path) -> None:
    """The drain SIGTERM triggers (proxy.app.Server.drain), in-process so the probe does not
    cost another ~10 s process start: the socket stays open and /readyz says 503 while a stream
    in flight finishes; new completions are refused with 503 + Retry-After."""
    config = Config.model_validate({
        "server": {"port": 0},
        "backends": [{"name": "fake", "base_url": upstream[1], "api_key_env": None}],
        "store": {"data_dir": str(tmp_path / "data")}})
    app = build_app(config, environ={}, overrides=Overrides(embedder=embedder))
    server = Server(app, config)
    url = servers.run(server.start())
    reader = StreamReader(url, "A story told during a drain.", new_key())
    reader.start()
    assert reader.first.wait(10) and reader.error is None
    drain = asyncio.run_coroutine_threadsafe(server.drain(), servers.loop)
    readiness = []
    refused = None
    while reader.is_alive():
        readiness.append(poll_readiness(url))
        if readiness[-1] == 503 and refused is None:
            # a new request during the drain: the stream in flight keeps the socket open
            refused = requests.post(url + "/v1/chat/completions", timeout=10, json={
                "model": "deepseek-chat", "messages": [{"role": "user", "content": "late"}]})
        time.sleep(0.05)
    drain.result(30)
    assert refused is not None
    assert reader.lines[-1][1] == b"data: [DONE]"
    # the first probe may reach the loop before the drain task has run, and the last ones may find
    # the listener already closed (the stream's [DONE] is sent before the reader thread exits): from
    # the first 503 on, readiness never says 200 again, and a refused connection only ends the run
    off = next((i for i, r in enumerate(readiness) if r != 200), len(readiness))
    tail = readiness[off:]
    draining = list(itertools.takewhile(lambda r: r == 503, tail))
    assert draining and set(tail[len(draining):]) <= {"refused"}, readiness
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
