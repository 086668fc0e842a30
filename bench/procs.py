"""Subprocesses for the benchmark: start, wait until ready, read their /proc counters, stop.

Linux only (``/proc``). CPU time is ``utime + stime`` of ``/proc/<pid>/stat``, which covers every
thread of the process, also threads that have ended. Peak RSS is ``VmHWM`` of
``/proc/<pid>/status``; ``reset_peak_rss`` writes 5 to ``/proc/<pid>/clear_refs`` so each scenario
gets its own peak (Linux >= 4.0; where that is refused the peak is the process's lifetime peak).
A ``Service`` started with ``tree=True`` (a server that may fork workers, such as LiteLLM's proxy)
counts its whole process tree: the CPU of every live descendant plus what reaped children left in
the root's ``cutime``/``cstime``, and the sum of their peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent


def bench_env() -> dict[str, str]:
    """The environment every benchmark process runs with: one thread per native runtime."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    env.pop("SEMCACHE_ADMIN_TOKEN", None)
    env.pop("SEMCACHE_METRICS_TOKEN", None)   # the harness reads /metrics without one
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: bytes, headers: dict[str, str],
              timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def get_json(url: str) -> Any:
    status, body = http_get(url)
    if status != 200:
        raise RuntimeError(f"GET {url} answered {status}")
    return json.loads(body)


class Service:
    """A long-running child process (fake upstream or proxy) with its log in ``log_dir``."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *, env: dict[str, str] | None = None,
                 tree: bool = False, cwd: Path = ROOT) -> None:
        self.name = name
        self.tree = tree
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env if env is not None else bench_env(),
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, url: str, timeout: float) -> float:
        """Poll ``url`` until it answers 200; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                if http_get(url, timeout=2.0)[0] == 200:
                    return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        """This process and, with ``tree``, every live descendant."""
        if not self.tree:
            return [self.pid]
        parent_of: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    parent_of[int(entry)] = int(_stat_fields(int(entry))[1])
        found, frontier = [self.pid], [self.pid]
        while frontier:
            children = [pid for pid, ppid in parent_of.items() if ppid in frontier]
            found += children
            frontier = children
        return found

    def cpu_s(self) -> float:
        """User + system CPU seconds of the whole process (with ``tree``: process tree) so far."""
        fields = _stat_fields(self.pid)
        # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14 to 17
        total = int(fields[11]) + int(fields[12])
        if self.tree:
            total += int(fields[13]) + int(fields[14])
            for pid in self.pids()[1:]:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    child = _stat_fields(pid)
                    total += int(child[11]) + int(child[12])
        return total / CLK_TCK

    def wait_idle(self, window: float = 0.5, max_share: float = 0.05, timeout: float = 60.0) -> float:
        """Wait until the process uses under ``max_share`` of a core over ``window`` seconds (work
        left from an earlier run, such as a backlog of cache stores, would otherwise be billed to
        the next one); returns the seconds waited beyond the first window."""
        started = time.monotonic()
        while True:
            before = self.cpu_s()
            time.sleep(window)
            if (self.cpu_s() - before) / window < max_share or time.monotonic() - started > timeout:
                return time.monotonic() - started - window

    def _status_kib(self, key: str) -> int:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
                        break
        return total

    def rss_mib(self) -> float:
        return self._status_kib("VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        return self._status_kib("VmHWM") / 1024

    def reset_peak_rss(self) -> bool:
        done = True
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as handle:
                    handle.write("5")
            except OSError:
                done = False
        return done

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def _stat_fields(pid: int) -> list[str]:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (the command name may hold spaces)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
        stat = handle.read()
    return stat[stat.rindex(")") + 2:].split()


def start_upstream(log_dir: Path, port: int) -> Service:
    svc = Service("fake_upstream", [sys.executable, "-m", "bench.fake_upstream", "--port", str(port),
                                    "--latency-ms", "0"], log_dir)
    svc.wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout=60)
    return svc


def shipped_model() -> tuple[dict[str, Any], float]:
    """The embedding settings (model, runtime, quantize, workers, cache_dir) and the threshold of
    config/proxy.yaml, for the tools that should run what `make run` serves."""
    from proxy.config import load_config  # here: the load generator imports this module too

    shipped = load_config(ROOT / "config" / "proxy.yaml")
    embedding = shipped.embedding
    return ({"model": embedding.model, "runtime": embedding.runtime, "quantize": embedding.quantize,
             "workers": embedding.workers, "cache_dir": embedding.cache_dir}, shipped.cache.threshold)


def start_proxy(name: str, config_path: Path, log_dir: Path, env: dict[str, str] | None = None,
                cwd: Path = ROOT) -> Service:
    """``python -m proxy serve``; ``cwd`` picks the source tree whose ``proxy`` package runs."""
    return Service(name, [sys.executable, "-m", "proxy", "serve", "--config", str(config_path)], log_dir,
                   env=env, cwd=cwd)


def pid_cpu_s(pid: int) -> float:
    """User + system CPU seconds of any process (one not started through ``Service``)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
