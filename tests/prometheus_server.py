"""Test helpers: a real Prometheus server on a free loopback port, and Debian tools installed on demand.

``ensure_tool("prometheus", "prometheus")`` finds a binary, or installs its Debian package with
apt-get when running as root (as the Makefile does); None when neither works, so a test can skip
with the reason. :class:`PrometheusServer` writes a scrape config for the given targets, starts
the server with its own data folder, and talks to its HTTP API.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

_INSTALL_TRIED: dict[str, str] = {}


def ensure_tool(binary: str, package: str, timeout: float = 900) -> str | None:
    """The path of ``binary``; installs Debian's ``package`` first when it is missing and we are
    root with apt-get. None (and the reason in ``install_failure(binary)``) when that fails."""
    found = shutil.which(binary)
    if found:
        return found
    if binary in _INSTALL_TRIED:
        return None
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        _INSTALL_TRIED[binary] = "not root or no apt-get: install it by hand (make test does)"
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], env=env, check=True, capture_output=True, timeout=timeout)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", package], env=env,
                       check=True, capture_output=True, timeout=timeout)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        _INSTALL_TRIED[binary] = f"apt-get install {package} failed: {exc} {detail[-500:]!r}"
        return None
    found = shutil.which(binary)
    if not found:
        _INSTALL_TRIED[binary] = f"apt-get installed {package} but {binary} is not on PATH"
    return found


def install_failure(binary: str) -> str:
    return _INSTALL_TRIED.get(binary, f"{binary} not found")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrometheusError(Exception):
    pass


class PrometheusServer:
    """One Prometheus process scraping ``jobs`` (job name -> ["host:port", ...]) every ``interval``."""

    def __init__(self, binary: str, workdir: Path, jobs: Mapping[str, Sequence[str]],
                 interval: str = "1s") -> None:
        self.binary = binary
        self.workdir = workdir
        self.jobs = jobs
        self.interval = interval
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.interval, "evaluation_interval": self.interval,
                       "scrape_timeout": self.interval},
            "scrape_configs": [
                {"job_name": job, "metrics_path": "/metrics", "scrape_interval": self.interval,
                 "static_configs": [{"targets": list(targets)}]}
                for job, targets in self.jobs.items()],
        }

    def start(self, timeout: float = 60) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between probing and binding
            self.port = free_port()
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    [self.binary, f"--config.file={config}",
                     f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}",
                     "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
            try:
                self._wait_ready(timeout)
                return
            except PrometheusError as exc:
                last = exc
                self.stop()
        raise PrometheusError(f"prometheus did not start: {last}\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PrometheusError(f"exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise PrometheusError("not ready in time")

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    # -- HTTP API ------------------------------------------------------------------------------

    def api(self, path: str, **params: str | Sequence[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            answer = json.loads(exc.read() or b"{}")
        if answer.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now; the result vector (scalars come back as one element)."""
        data = self.api("query", query=expr, time=f"{time.time():.3f}")
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> dict[str, str]:
        data = self.api("targets", state="active")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    def wait_scraped(self, times: int = 2, timeout: float = 60) -> None:
        """Wait until every target has been scraped successfully ``times`` more times."""
        def scrapes() -> dict[str, float]:
            return {item["metric"]["instance"]: float(item["value"][1])
                    for item in self.query("count_over_time(up[1h])")}

        start = scrapes()
        deadline = time.monotonic() + timeout
        expected = sum(len(t) for t in self.jobs.values())
        while time.monotonic() < deadline:
            now = scrapes()
            if len(now) >= expected and all(now[i] >= start.get(i, 0) + times for i in now):
                health = self.targets_up()
                if all(h == "up" for h in health.values()):
                    return
            time.sleep(0.25)
        raise PrometheusError(f"targets not scraped in time: {self.targets_up()}\n{self.log_tail()}")
