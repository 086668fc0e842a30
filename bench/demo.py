"""`make demo`: the proxy in front of a real local model, fully offline, in under two minutes.

Starts llama.cpp's server with SmolLM2-135M-Instruct (tests/llamacpp.py), then the proxy in front
of it (a config written to a temporary folder), asks a few questions and paraphrases with the
official openai SDK, and prints for each whether it came from the model or from the cache
(the ``x-semcache`` header: miss, exact, semantic or coalesced) and, at the end, what the cache
saved (backend calls and tokens, from the proxy's own /metrics). Then it stops everything.

    python -m bench.demo            # or: make demo
"""

from __future__ import annotations

import signal
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import Service, free_port, http_get, shipped_model, start_proxy
from tests.llamacpp import MODEL_ALIAS, LlamaServer, unavailable

TIME_LIMIT_S = 115
MAX_TOKENS = 48

# (question, what to expect): paraphrases chosen so the shipped model and threshold (int8 MiniLM
# at 0.965, config/proxy.yaml) show both sides, a near miss the guards refuse, a paraphrase the
# learned verifier refuses, and a burst of identical questions sharing one call
SCRIPT: list[tuple[str, str]] = [
    ("What is the capital of France?", "a new question: the model answers"),
    ("What is the capital of France?", "asked again: exact hit"),
    ("What's the capital of France?", "a paraphrase: semantic hit"),
    ("How do I make a cup of tea?", "new"),
    ("How do you make a cup of tea?", "a paraphrase: semantic hit"),
    ("Explain photosynthesis in simple words.", "new"),
    ("Explain photosynthesis in simple terms.",
     "a paraphrase the verifier refuses (one word swapped): a miss, the price of fewer wrong hits"),
    ("What is the capital of Germany?", "looks alike, means something else: a miss"),
    ("What is the best way to make tea?", "a looser paraphrase, below the threshold: a miss"),
]
BURST = ("Name three primary colours.", 3)


def config(port: int, llama_url: str) -> dict[str, Any]:
    embedding, threshold = shipped_model()
    return {
        "server": {"host": "127.0.0.1", "port": port, "admin_token_env": None, "log_level": "WARNING"},
        "backends": [{"name": "llama", "type": "vllm", "base_url": llama_url, "api_key_env": None,
                      "models": ["*"], "max_concurrency": 8}],
        "embedding": embedding,
        # answers cut at max_tokens end with "length"; the demo keeps them short on purpose
        "cache": {"store_finish_reasons": ["stop", "length"], "threshold": threshold},
        "store": {"data_dir": ""},
    }


def ask(client: openai.OpenAI, question: str) -> tuple[str, str, str, float]:
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS,
        temperature=0)
    answer = raw.parse().choices[0].message.content or ""
    seconds = time.perf_counter() - started
    return raw.headers.get("x-semcache", "?"), raw.headers.get("x-semcache-similarity", ""), answer, seconds


def show(n: int, question: str, state: str, score: str, answer: str, seconds: float, note: str) -> None:
    short = textwrap.shorten(" ".join(answer.split()), 58, placeholder="...")
    sim = f" {score}" if score else ""
    print(f"{n:>2}. [{state + sim:<16}] {seconds * 1000:6.0f} ms  {question}")
    print(f"    {'':16}            -> {short}   ({note})")


def metrics(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    status, body = http_get(url + "/metrics")
    if status != 200:
        return {}
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


def total(found: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return sum(value for key, value in found.get(name, {}).items()
               if all((k, v) in key for k, v in labels.items()))


def summary(url: str, asked: int) -> None:
    m = metrics(url)
    calls = total(m, "semcache_backend_request_duration_seconds_count")
    hits = {r: total(m, "semcache_cache_lookups_total", result=r) for r in ("exact", "semantic")}
    coalesced = total(m, "semcache_coalesced_requests_total")
    kinds = ("prompt", "completion")
    spent = {k: total(m, "semcache_tokens_total", kind=k, source="backend") for k in kinds}
    saved = {k: total(m, "semcache_tokens_total", kind=k, source="cache")
             + total(m, "semcache_tokens_total", kind=k, source="coalesced") for k in kinds}
    print()
    print(f"{asked} questions -> {calls:.0f} calls to the model; "
          f"{hits['exact']:.0f} exact hits, {hits['semantic']:.0f} semantic hits, "
          f"{coalesced:.0f} coalesced with a call in flight")
    print(f"tokens spent on the model: {spent['prompt']:.0f} prompt + {spent['completion']:.0f} completion")
    print(f"tokens saved by the cache: {saved['prompt']:.0f} prompt + {saved['completion']:.0f} completion "
          f"({asked - calls:.0f} of {asked} calls not made)")
    joules = total(m, "semcache_energy_joules_total", source="cache") + total(
        m, "semcache_energy_joules_total", source="coalesced")
    usd = total(m, "semcache_cost_usd_total", source="cache") + total(
        m, "semcache_cost_usd_total", source="coalesced")
    if joules or usd:
        print(f"estimated saving: {usd:.6f} USD, {joules:.1f} J (config/prices.yaml, docs/accounting.md)")


def _expire(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError(f"the demo took longer than {TIME_LIMIT_S} s")


def main() -> int:
    reason = unavailable()
    if reason is not None:
        print(f"demo needs the local model: {reason}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGALRM, _expire)
    signal.alarm(TIME_LIMIT_S)
    started = time.perf_counter()
    llama = LlamaServer(parallel=4)
    proxy: Service | None = None
    with tempfile.TemporaryDirectory(prefix="semcache-demo-") as tmp:
        try:
            print("starting llama.cpp's server with SmolLM2-135M-Instruct (1 thread, 4 slots)...")
            llama.start()
            port = free_port()
            path = Path(tmp) / "proxy.yaml"
            path.write_text(yaml.safe_dump(config(port, llama.url)))
            print(f"starting the proxy in front of it ({path}); loading the embedding model...")
            proxy = start_proxy("proxy", path, Path(tmp))
            url = f"http://127.0.0.1:{port}"
            proxy.wait_ready(url + "/readyz", timeout=90)
            print(f"ready after {time.perf_counter() - started:.0f} s: llama.cpp at {llama.url}, "
                  f"proxy at {url}")
            print("(SmolLM2-135M is tiny and often wrong: watch what the proxy does, not the answers)\n")
            client = openai.OpenAI(base_url=url + "/v1", api_key="demo-key", max_retries=0, timeout=60)
            n = 0
            for question, note in SCRIPT:
                n += 1
                show(n, question, *ask(client, question), note)
            question, copies = BURST
            with ThreadPoolExecutor(copies) as pool:
                answers = list(pool.map(lambda q: ask(client, q), [question] * copies))
            for state, score, answer, seconds in answers:
                n += 1
                show(n, question, state, score, answer, seconds, f"{copies} at once: one call, shared")
            summary(url, n)
            print(f"\ndone in {time.perf_counter() - started:.0f} s")
            return 0
        except (TimeoutError, RuntimeError, openai.OpenAIError) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            if proxy is not None:
                print(proxy.log_tail(), file=sys.stderr)
            return 1
        finally:
            signal.alarm(0)
            if proxy is not None:
                proxy.stop()
            llama.stop()


if __name__ == "__main__":
    sys.exit(main())
