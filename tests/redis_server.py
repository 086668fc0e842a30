"""A real ``redis-server`` for tests: its own process, a free loopback port, a temporary folder;
and proxies run as operators run them (``python -m proxy serve``) against it.

Faults are real too: ``kill()`` (SIGKILL), ``freeze()``/``thaw()`` (SIGSTOP/SIGCONT), ``restart()``
on the same port and folder (so AOF/RDB files are read back when persistence is on).
When ``redis-server`` is missing it is installed with apt-get (as CI does through ``make test``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
import yaml


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    """Path of redis-server; installs Debian's package when it is missing."""
    found = shutil.which("redis-server")
    if found is None and os.path.exists("/usr/bin/redis-server"):
        found = "/usr/bin/redis-server"
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run([*sudo, "apt-get", "install", "-y", "redis-server"], check=True, env=env,
                   capture_output=True, timeout=600)
    found = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(found):
        raise RuntimeError("redis-server is not installed and apt-get could not install it")
    return found


class RedisServer:
    """One redis-server; ``extra`` adds command-line options (``--replicaof``, ``--cluster-enabled``)."""

    def __init__(self, root: Path, *, port: int | None = None, persistence: bool = False,
                 extra: Sequence[str] = ()) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.persistence = persistence
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout)

    def start(self, timeout: float = 20.0) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
                "--daemonize", "no", "--protected-mode", "yes", "--logfile", str(self.log_path),
                "--databases", "4", "--enable-debug-command", "local"]
        if self.persistence:
            argv += ["--appendonly", "yes", "--appendfsync", "always", "--save", "60 1"]
        else:
            argv += ["--appendonly", "no", "--save", ""]
        argv += self.extra
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(redis.RedisError, OSError), self.client(timeout=0.5) as client:
                if client.ping():
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not answering on {self.port}:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no final save."""
        if self.alive():
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM: Redis saves (when persistence is on) and exits."""
        if self.alive():
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            assert self.proc is not None
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def freeze(self) -> None:
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()

    def dump(self) -> list[tuple[bytes, bytes]]:
        """Every key and everything stored under it (stream entries and hash fields flattened)."""
        out: list[tuple[bytes, bytes]] = []
        with self.client() as client:
            for key in client.scan_iter(count=1000):
                kind = client.type(key)
                if kind == b"string":
                    out.append((key, client.get(key) or b""))
                elif kind == b"hash":
                    out += [(key, k + b"=" + v) for k, v in client.hgetall(key).items()]
                elif kind == b"zset":
                    out += [(key, member) for member, _ in client.zrange(key, 0, -1, withscores=True)]
                elif kind == b"stream":
                    for _, fields in client.xrange(key):
                        out += [(key, k + b"=" + v) for k, v in fields.items()]
                else:
                    out.append((key, b""))
        return out


# -- Sentinel and Cluster deployments ----------------------------------------------------------------


def _wait(check: Any, what: str, timeout: float) -> Any:
    """Poll ``check()`` until it returns something truthy (errors count as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class SentinelDeployment:
    """A master, one replica and one sentinel (quorum 1) monitoring them as ``service``: the
    smallest deployment where ``SENTINEL FAILOVER`` has a replica to promote. Without the
    replica it starts at once (the sentinel has nothing to discover) but cannot fail over."""

    def __init__(self, root: Path, service: str = "semcache", *, replica: bool = True) -> None:
        self.root = root
        self.service = service
        self.master = RedisServer(root / "a")
        self.replica = RedisServer(root / "b", extra=["--replicaof", "127.0.0.1", str(self.master.port)]) \
            if replica else None
        self.sentinel_port = free_port()
        self.sentinel: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/0"

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel_port, socket_timeout=5,
                           socket_connect_timeout=5)

    def start(self, timeout: float = 20.0) -> SentinelDeployment:
        self.master.start(timeout)
        if self.replica is not None:
            self.replica.start(timeout)
        conf = self.root / "sentinel.conf"  # the sentinel rewrites it: a file of its own
        conf.write_text("\n".join([
            f"port {self.sentinel_port}", "bind 127.0.0.1", "daemonize no", f"dir {self.root}",
            f"logfile {self.root / 'sentinel.log'}",
            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 1",
            f"sentinel down-after-milliseconds {self.service} 1000",
            f"sentinel failover-timeout {self.service} 3000",
            f"sentinel parallel-syncs {self.service} 1", ""]))
        self.sentinel = subprocess.Popen([redis_binary(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def master_port(self) -> int:
        with self.sentinel_client() as client:
            _, port = client.sentinel_get_master_addr_by_name(self.service)
        return int(port)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the sentinel names the master and sees the replica in sync (so a failover can run)."""
        _wait(self.master_port, "the sentinel to name the master", timeout)
        if self.replica is None:
            return

        def replica_known() -> bool:
            with self.sentinel_client() as client:
                replicas = client.sentinel_slaves(self.service)
            return any(r.get("is_slave") and not r.get("is_sdown") and r.get("master-link-status") == "ok"
                       for r in replicas)
        _wait(replica_known, "the sentinel to see the replica", timeout)

    def failover(self, timeout: float = 20.0) -> int:
        """``SENTINEL FAILOVER``; returns the port of the new master once it acts as one."""
        old = self.master_port()
        def ask() -> bool:
            # refused (NOGOODSLAVE) until the sentinel has fresh news of the replica: ask again
            with self.sentinel_client() as client:
                return bool(client.execute_command("SENTINEL", "FAILOVER", self.service))
        _wait(ask, "SENTINEL FAILOVER to be accepted", timeout)
        new = _wait(lambda: (port := self.master_port()) != old and port, "a new master", timeout)

        def acts_as_master() -> bool:
            with redis.Redis(host="127.0.0.1", port=new, socket_timeout=2) as client:
                return bool(client.role()[0] == b"master")
        _wait(acts_as_master, "the new master to take writes", timeout)
        return int(new)

    def log_tail(self) -> str:
        try:
            return (self.root / "sentinel.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.sentinel is not None and self.sentinel.poll() is None:
            self.sentinel.kill()
            self.sentinel.wait(10)
        if self.replica is not None:
            self.replica.kill()
        self.master.kill()


class ClusterDeployment:
    """``masters`` redis-servers in cluster mode with the 16384 slots split between them, joined
    with CLUSTER ADDSLOTSRANGE and CLUSTER MEET (what ``redis-cli --cluster create`` does)."""

    def __init__(self, root: Path, masters: int = 3) -> None:
        # the bus port is port + 10000 unless named: name a free one (high ports overflow)
        self.bus_ports = [free_port() for _ in range(masters)]
        self.nodes = [RedisServer(root / f"n{i}", extra=[
            "--cluster-enabled", "yes", "--cluster-config-file", str(root / f"n{i}" / "nodes.conf"),
            "--cluster-node-timeout", "2000", "--cluster-port", str(bus)])
            for i, bus in enumerate(self.bus_ports)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 20.0) -> ClusterDeployment:
        for node in self.nodes:
            node.start(timeout)
        per = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = 16383 if i == len(self.nodes) - 1 else (i + 1) * per - 1
            with node.client() as client:
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        with self.nodes[0].client() as client:
            for node, bus in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus)

        def all_ok() -> bool:
            for node in self.nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                        return False
            return True
        _wait(all_ok, "the cluster to agree", timeout)
        return self

    def node_of(self, key: str) -> RedisServer:
        """The master serving ``key``'s slot."""
        with self.nodes[0].client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, (_, port, *_), *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(port))
        raise LookupError(key)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


# -- proxies as operators run them -------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


class ProxyProcess:
    """``python -m proxy serve --config <yaml>`` in its own process; ``config`` is the YAML as a
    dict (server.port is filled in), ``env`` adds to the environment."""

    def __init__(self, name: str, root: Path, config: dict[str, Any],
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.env = env or {}
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}-{self.starts}.log"

    def launch(self) -> ProxyProcess:
        """Start without waiting (see ``wait_ready``), so several can load their model at once."""
        assert not self.alive()
        self.config.setdefault("server", {})["port"] = self.port
        path = self.root / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(self.config))
        self.starts += 1
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               **self.env}
        env.pop("SEMCACHE_ADMIN_TOKEN", None)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)],
                                         cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 180.0) -> ProxyProcess:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError), \
                    urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready:\n{self.log_tail()}")
            time.sleep(0.1)

    def start(self) -> ProxyProcess:
        return self.launch().wait_ready()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def start_all(*proxies: ProxyProcess) -> None:
    for proxy in proxies:
        if not proxy.alive():
            proxy.launch()
    for proxy in proxies:
        proxy.wait_ready()


def redis_proxy_config(*, upstream_url: str, models_dir: str, redis_url: str, namespace: str,
                       data_dir: str, cache: dict[str, Any] | None = None,
                       store: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "admin_token_env": None, "log_level": "INFO", "drain_timeout_s": 5},
        "backends": [{"name": "fake", "base_url": upstream_url, "api_key_env": None}],
        "embedding": {"cache_dir": models_dir},
        "cache": {"threshold": 0.95, **(cache or {})},
        "store": {"type": "redis", "url": redis_url, "namespace": namespace, "data_dir": data_dir,
                  **(store or {})},
    }
