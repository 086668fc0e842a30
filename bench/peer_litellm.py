"""LiteLLM's proxy as the benchmark's peer, in its own virtualenv (never the project's).

    python -m bench.peer_litellm --install     # creates bench/.venv-litellm (git-ignored), ~3 minutes
    python -m bench.peer_litellm --check       # starts it in front of a fake upstream, one request

``bench.run_bench --peer litellm`` uses it: two LiteLLM proxy processes in front of the same fake
upstream as our proxy, one with caching off and one with LiteLLM's local (in-process) cache. The
model list maps ``deepseek-chat`` to ``openai/deepseek-chat`` at the fake upstream's ``/v1``.

LiteLLM's semantic caches are not benchmarked: ``redis-semantic`` needs Redis Stack (RediSearch 2.x
vector search; Debian ships RediSearch 1.2, without vectors) and ``qdrant-semantic`` a Qdrant
server (not on PyPI or Debian), and both call an embedding model through LiteLLM (a hosted API;
the fake upstream has no embeddings route). None of that can be installed offline here.

The peer is pinned. 1.100.5 is the newest release whose dependencies resolve on this machine's
package index (1.101 and later require certifi >= 2026.10.19, which it does not have); it predates
the compromised 1.107.0 release. The peer gets a minimal environment (no variables of ours, no
keys: the fake upstream accepts any), LiteLLM's bundled model-cost map instead of a download at
start, and telemetry off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.procs import ROOT, Service, free_port, http_post, start_upstream

VENV = ROOT / "bench" / ".venv-litellm"
PIN = "litellm[proxy]==1.100.5"
MODEL = "deepseek-chat"
READY_PATH = "/health/liveliness"


def executable() -> Path:
    return VENV / "bin" / "litellm"


def available() -> bool:
    return executable().exists()


def install() -> None:
    """Create the peer's own virtualenv and install the pinned LiteLLM proxy into it."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", PIN], check=True)


def env() -> dict[str, str]:
    """A minimal environment: nothing of the caller's leaks into the peer, one thread per runtime."""
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",   # no download of the cost map at start
            "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION"}


def config(upstream: str, *, cache: bool) -> dict[str, Any]:
    """LiteLLM proxy config: one model at the fake upstream; the local cache when ``cache``."""
    settings: dict[str, Any] = {"drop_params": True, "request_timeout": 60, "set_verbose": False,
                                "json_logs": False}
    if cache:
        settings.update(cache=True, cache_params={"type": "local"})
    return {
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": upstream.rstrip("/") + "/v1", "api_key": "sk-fake"}}],
        "litellm_settings": settings,
        "general_settings": {},
    }


def start(name: str, upstream: str, log_dir: Path, *, cache: bool) -> tuple[Service, str]:
    """Start one LiteLLM proxy (one uvicorn worker); returns it and its base URL once ready."""
    port = free_port()
    path = log_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config(upstream, cache=cache)))
    svc = Service(name, [str(executable()), "--config", str(path), "--host", "127.0.0.1",
                         "--port", str(port), "--num_workers", "1"], log_dir, env=env(), tree=True)
    base = f"http://127.0.0.1:{port}"
    svc.wait_ready(base + READY_PATH, timeout=300)
    return svc, base


def check() -> None:
    with tempfile.TemporaryDirectory(prefix="litellm-peer-") as tmp_name:
        tmp = Path(tmp_name)
        up_port = free_port()
        upstream = start_upstream(tmp, up_port)
        try:
            started = time.monotonic()
            svc, base = start("litellm-check", f"http://127.0.0.1:{up_port}", tmp, cache=True)
            print(f"ready in {time.monotonic() - started:.1f} s, RSS {svc.rss_mib():.0f} MiB")
            body = b'{"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}'
            for attempt in range(2):
                status, headers, answer = http_post(base + "/v1/chat/completions", body, {})
                cache_headers = {k: v for k, v in headers.items() if "cache" in k}
                print(attempt, status, cache_headers, answer[:120])
            svc.stop()
        finally:
            upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="LiteLLM's proxy as the benchmark peer")
    parser.add_argument("--install", action="store_true", help=f"create {VENV} with {PIN}")
    parser.add_argument("--check", action="store_true", help="start it once and send two requests")
    args = parser.parse_args()
    if args.install:
        install()
    if args.check:
        if not available():
            sys.exit(f"{executable()} not found: run python -m bench.peer_litellm --install first")
        check()


if __name__ == "__main__":
    main()
