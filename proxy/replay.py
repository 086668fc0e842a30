"""``python -m proxy replay``: what the cache would have saved on a prompt workload.

    python -m proxy replay --prompts bench/data/wildchat_first_turns_280.json [--config FILE]
        [--threshold 0.97] [--passes 1] [--show 10]

Each prompt becomes a one-turn chat request (same tenant, same model) and goes through the
proxy's own pipeline: the real plan (scope, exact key, language rules), the configured embedding
model(s), the FAISS index, the in-process store, the guards and thresholds. Only the backend is
synthetic: a miss gets an answer made up on the spot, with an estimated usage (prompt tokens:
UTF-8 bytes / 4; completion tokens: ``--completion-tokens``), and is stored as a real answer
would be. Lookups get a generous timeout here, so a slow machine changes no decision.

Reported: hits by kind (exact, semantic), the hit ratio, backend calls saved, estimated tokens
saved, why prompts skipped semantic matching, how often each guard refused a candidate, and the
semantic hits themselves (new prompt, cached prompt, similarity) so a person can judge them.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from .cachekey import Directives
from .config import Config, load_config_or_defaults
from .ports import Embedder, UpstreamRequest, UpstreamResponse

PREFIX = "[replay] answer to: "


def load_prompts(path: Path) -> list[str]:
    """A JSON list of strings, or of objects with a ``prompt`` / ``text`` / ``content`` string."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of prompts")
    prompts = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            item = next((item[k] for k in ("prompt", "text", "content")
                         if isinstance(item.get(k), str)), None)
        if not isinstance(item, str):
            raise ValueError(f"{path}: item {i} is neither a string nor an object with a prompt")
        prompts.append(item)
    return prompts


def estimate_tokens(text: str) -> int:
    """A rough token count without the LLM's tokenizer: UTF-8 bytes / 4 (English text is about
    4 bytes a token; a Chinese character is 3 bytes and roughly one token)."""
    return max(1, round(len(text.encode("utf-8")) / 4))


class SyntheticBackend:
    """Backend port that answers every chat request at once with a made-up answer."""

    def __init__(self, completion_tokens: int) -> None:
        self._completion_tokens = completion_tokens
        self.calls = 0

    @property
    def name(self) -> str:
        return "replay"

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        self.calls += 1
        body = orjson.loads(request.body)
        prompt = body["messages"][-1]["content"]
        answer = {
            "id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
            "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": PREFIX + prompt}}],
            "usage": {"prompt_tokens": estimate_tokens(prompt), "completion_tokens": self._completion_tokens,
                      "total_tokens": estimate_tokens(prompt) + self._completion_tokens},
        }
        return UpstreamResponse(status=200, headers={"content-type": "application/json"},
                                body=orjson.dumps(answer))

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class Tally:
    results: Counter[str] = field(default_factory=Counter)
    prompt_tokens_saved: int = 0
    completion_tokens_saved: int = 0
    semantic: list[tuple[float, str, str]] = field(default_factory=list)  # (score, new, cached)

    @property
    def total(self) -> int:
        return sum(self.results.values())

    @property
    def hits(self) -> int:
        return self.results["exact"] + self.results["semantic"]


def _counter_values(registry: Any, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name and sample.value:
                out[next(iter(sample.labels.values()), "")] = sample.value
    return out


async def replay(config: Config, prompts: Sequence[str], *, model: str = "deepseek-chat",
                 completion_tokens: int = 200, passes: int = 1, progress: bool | None = None,
                 embedders: Mapping[str, Embedder] | None = None,
                 ) -> tuple[Tally, dict[str, float], dict[str, float], int]:
    """Run the workload; (tally, bypass reasons, guard refusals, backend calls). ``embedders``
    (by model id) are used as given, not started or closed; the others are built here."""
    from prometheus_client import CollectorRegistry
    from tqdm import tqdm

    from .app import make_embedder, make_policy
    from .cache import CacheSettings, SemanticCache
    from .clock import SystemClock
    from .index import FaissIndex
    from .metrics import PrometheusMetrics
    from .pipeline import ApiRequest, Pipeline
    from .store.memory import MemoryStore
    from .tasks import TaskTracker

    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry, backends=("replay",))
    clock = SystemClock()
    cache_config = config.cache
    given = dict(embedders or {})
    models: dict[str, Embedder] = {}
    owned: list[Embedder] = []
    if cache_config.semantic:
        for ident, model_config in config.embedding.models().items():
            if ident in given:
                models[ident] = given[ident]
            else:
                models[ident] = make_embedder(model_config)
                owned.append(models[ident])
    store = MemoryStore(max_entries=cache_config.max_entries, max_bytes=cache_config.max_bytes,
                        data_dir="", snapshot_interval_s=config.store.snapshot_interval_s, clock=clock)
    index = FaissIndex()
    cache = SemanticCache(
        store=store, index=index, embedder=models.get(config.embedding.ident), embedders=models,
        clock=clock, metrics=metrics,
        settings=CacheSettings(ttl_s=cache_config.ttl_s, top_k=cache_config.top_k,
                               max_entry_bytes=cache_config.max_entry_bytes,
                               store_finish_reasons=frozenset(cache_config.store_finish_reasons),
                               lookup_timeout_s=max(30.0, cache_config.lookup_timeout_s)))
    backend = SyntheticBackend(completion_tokens)
    tasks = TaskTracker()
    policy = make_policy(config)
    pipeline = Pipeline(cache=cache, route_backend=lambda _: backend, metrics=metrics, clock=clock,
                        policy=lambda: policy, tasks=tasks)
    tally = Tally()
    for embedder in owned:
        await embedder.start()
    await store.start()
    try:
        total = len(prompts) * passes
        with tqdm(total=total, desc="replaying", unit="prompt", file=sys.stderr,
                  disable=(not sys.stderr.isatty()) if progress is None else not progress) as bar:
            for _ in range(passes):
                for prompt in prompts:
                    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
                    reply = await pipeline.complete(ApiRequest(
                        route="chat", body=body, raw=orjson.dumps(body), headers={}, tenant="replay",
                        upstream_auth=None, directives=Directives(), started=clock.monotonic()))
                    await tasks.join(grace=60)   # the answer is stored before the next prompt
                    tally.results[reply.result] += 1
                    if reply.result in ("exact", "semantic"):
                        usage = reply.tokens
                        tally.prompt_tokens_saved += int(usage.get("prompt_tokens") or 0)
                        tally.completion_tokens_saved += int(usage.get("completion_tokens") or 0)
                    if reply.result == "semantic":
                        served = orjson.loads(reply.body)["choices"][0]["message"]["content"]
                        score = float(reply.headers.get("x-semcache-similarity", "nan"))
                        tally.semantic.append((score, prompt, served.removeprefix(PREFIX)))
                    bar.update(1)
    finally:
        for embedder in owned:
            await embedder.close()
        await store.close()
        await index.close()
    return (tally, _counter_values(registry, "semcache_cache_bypass_total"),
            _counter_values(registry, "semcache_cache_guard_refusals_total"), backend.calls)


def _contrast(new: str, cached: str, width: int = 100) -> tuple[str, str]:
    """Both texts from a little before the first place they differ, so a reader sees it."""
    a, b = " ".join(new.split()), " ".join(cached.split())
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    start = max(0, same - 30)

    def cut(text: str) -> str:
        piece = text[start:start + width]
        return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")

    return cut(a), cut(b)


def print_report(tally: Tally, bypass: dict[str, float], refusals: dict[str, float], calls: int,
                 config: Config, show: int, out: TextIO) -> None:
    total = tally.total

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f}%" if total else "-"

    embedding = config.embedding
    own = [f"{script}: {spec.threshold:g}" for script, spec in embedding.languages.items()
           if spec.threshold is not None]
    print(f"replayed {total} prompts; models {', '.join(embedding.models())}; threshold "
          f"{config.cache.threshold:g}" + (f" (own thresholds: {', '.join(own)})" if own else "")
          + f"; guards {', '.join(config.cache.guards) or 'off'}", file=out)
    print(f"  exact hits     {tally.results['exact']:6d}  {pct(tally.results['exact'])}", file=out)
    print(f"  semantic hits  {tally.results['semantic']:6d}  {pct(tally.results['semantic'])}", file=out)
    print(f"  hit ratio      {tally.hits:6d}  {pct(tally.hits)}", file=out)
    print(f"  misses         {tally.results['miss']:6d}  {pct(tally.results['miss'])}", file=out)
    other = {k: v for k, v in tally.results.items() if k not in ("exact", "semantic", "miss")}
    if other:
        print("  other          " + ", ".join(f"{k} {v}" for k, v in sorted(other.items())), file=out)
    print(f"backend calls made {calls}, saved {tally.hits} "
          f"({pct(tally.hits)} of {total} requests)", file=out)
    print(f"estimated tokens saved: {tally.prompt_tokens_saved} prompt + {tally.completion_tokens_saved} "
          f"completion (prompt: UTF-8 bytes / 4; completion: a fixed guess per answer)", file=out)
    if bypass:
        print("semantic matching skipped: " + ", ".join(f"{k} {int(v)}" for k, v in sorted(bypass.items())),
              file=out)
    if refusals:
        print("guard refusals (a candidate above the threshold not served): "
              + ", ".join(f"{k} {int(v)}" for k, v in sorted(refusals.items())), file=out)
    if tally.semantic and show:
        print(f"\nsemantic hits (lowest similarity first, {min(show, len(tally.semantic))} of "
              f"{len(tally.semantic)}): judge them", file=out)
        for score, new, cached in sorted(tally.semantic)[:show]:
            a, b = _contrast(new, cached)
            print(f"  {score:.4f}  new:    {a}\n          cached: {b}", file=out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=Path, required=True,
                        help="JSON list of prompts (strings, or objects with a prompt/text/content)")
    parser.add_argument("--config", default="config/proxy.yaml",
                        help="proxy config (models, threshold, guards); defaults when missing")
    parser.add_argument("--threshold", type=float, default=None, help="instead of cache.threshold")
    parser.add_argument("--model", default="deepseek-chat",
                        help="the LLM model name the requests carry (selects model_thresholds)")
    parser.add_argument("--completion-tokens", type=int, default=200,
                        help="completion tokens assumed per answer (default 200)")
    parser.add_argument("--passes", type=int, default=1, help="replay the workload this many times")
    parser.add_argument("--show", type=int, default=10, help="semantic hits to print (default 10)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")


async def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    config = load_config_or_defaults(args.config)
    if args.threshold is not None:
        config = config.model_copy(update={"cache": config.cache.model_copy(
            update={"threshold": args.threshold})})
    prompts = load_prompts(args.prompts)
    tally, bypass, refusals, calls = await replay(
        config, prompts, model=args.model, completion_tokens=args.completion_tokens,
        passes=args.passes, progress=args.progress)
    print_report(tally, bypass, refusals, calls, config, args.show, out)
    return 0

