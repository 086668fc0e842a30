"""Vector index at 10k / 100k / 1M entries: build time, search latency, recall, memory.

    OMP_NUM_THREADS=1 python -m bench.index_bench --sizes 10000,100000,1000000 \
        --out bench/results/index_bench.json

The vectors (384-dim, unit length, the packaged MiniLM's space):

* **base**: every English prompt of ``bench/data`` (QQP tune + test questions, WildChat first
  turns) embedded once with the proxy's own embedder, minus the held-out texts below.
* **entries**: row r = normalise(b_i + a * b_j + s * g): a real prompt b_i, mixed with a share
  a ~ U(0, 0.6) of another b_j, plus Gaussian noise g of size s ~ U(0.05, 0.5) (cosine to b_i
  about 0.75-0.99); 10% of rows are near-duplicates of another row (noise 0.05-0.2). So there are
  clusters around each real prompt (about N / 11k rows each) and near-duplicates inside them.
* **held out**: the 2,000 originals of ``semantic_pairs.json.gz`` are rows 0..1999; their
  paraphrases are queries (real embedded text, should hit). WildChat prompts are not in base.
* **queries**: 1,000 *near* (a stored row plus noise, cosine 0.98-0.995: should hit), 1,000 *far*
  (280 real WildChat prompts + 720 mixtures with heavy noise: should miss), 2,000 *paraphrase*.

Ground truth is exact float32 search over the same rows. Each (size, index) runs in its own
process, so its peak RSS (VmHWM) is its own; the base process never holds the whole set.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DIM = 384
SEED = 20261122
#: rows per generated block (fixed: the data set depends on it)
GEN_CHUNK = 50_000
#: rows read at a time to add or score: the adapter's fetch size, so reads add little to RSS
CHUNK = 16_384
GT_K = 10
#: rows per exact-search block: 4,000 queries x 10k rows of scores is 160 MB
GT_CHUNK = 10_000


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def normalise(rows: np.ndarray) -> np.ndarray:
    out: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


# ---------------------------------------------------------------- data (base process)

def texts() -> tuple[list[str], list[str], list[str], list[str]]:
    """(base prompts, held-out originals, their paraphrases, far real prompts)."""
    pairs = json.loads(gzip.decompress((HERE / "data" / "semantic_pairs.json.gz").read_bytes()))["pairs"]
    held = {text.lower() for pair in pairs for text in (pair["q"], pair["p"])}
    wildchat = json.loads((HERE / "data" / "wildchat_first_turns_280.json").read_text())
    base: dict[str, None] = {}
    for name in ("qqp_tune.json.gz", "qqp_test.json.gz"):
        for pair in json.loads(gzip.decompress((HERE / "data" / name).read_bytes())):
            for text in (pair["a"], pair["b"]):
                if text.strip() and text.lower() not in held:
                    base.setdefault(text, None)
    return list(base), [p["q"] for p in pairs], [p["p"] for p in pairs], list(wildchat)


async def embed_all(groups: list[list[str]]) -> list[np.ndarray]:
    from proxy.config import EmbeddingConfig
    from proxy.embedding import SentenceEmbedder

    embedder = SentenceEmbedder(EmbeddingConfig(cache_dir=str(ROOT / "data" / "models")))
    await embedder.start()
    try:
        out = []
        for group in groups:
            parts = [(await embedder.embed(group[i:i + 64])).vectors for i in range(0, len(group), 64)]
            out.append(normalise(np.concatenate(parts)))
        return out
    finally:
        await embedder.close()


def embeddings(work: Path) -> dict[str, np.ndarray]:
    path = work / "embeddings.npz"
    if not path.exists():
        started = time.perf_counter()
        base, held_q, held_p, far = texts()
        arrays = asyncio.run(embed_all([base, held_q, held_p, far]))
        np.savez(path, base=arrays[0], held_q=arrays[1], held_p=arrays[2], far=arrays[3])
        print(f"embedded {sum(map(len, arrays))} texts in {time.perf_counter() - started:.0f} s", flush=True)
    with np.load(path) as loaded:
        return {name: loaded[name] for name in loaded.files}


def mixtures(rng: np.random.Generator, base: np.ndarray, n: int, share: tuple[float, float],
             noise: tuple[float, float]) -> np.ndarray:
    i, j = rng.integers(len(base), size=n), rng.integers(len(base), size=n)
    a = rng.uniform(*share, size=(n, 1)).astype(np.float32)
    s = rng.uniform(*noise, size=(n, 1)).astype(np.float32)
    g = rng.standard_normal((n, DIM), dtype=np.float32) / np.sqrt(DIM)
    return normalise(base[i] + a * base[j] + s * g)


def jitter(rng: np.random.Generator, rows: np.ndarray, noise: tuple[float, float]) -> np.ndarray:
    s = rng.uniform(*noise, size=(len(rows), 1)).astype(np.float32)
    return normalise(rows + s * rng.standard_normal(rows.shape, dtype=np.float32) / np.sqrt(DIM))


def dataset(work: Path, total: int, emb: dict[str, np.ndarray]) -> Path:
    """Rows as raw float32 in one file, written chunk by chunk."""
    path = work / f"rows_{total}.f32"
    if path.exists() and path.stat().st_size == total * DIM * 4:
        return path
    rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    with open(path.with_suffix(".tmp"), "wb") as out:
        out.write(emb["held_q"].tobytes())
        written = len(emb["held_q"])
        while written < total:
            n = min(GEN_CHUNK, total - written)
            rows = mixtures(rng, emb["base"], n, (0.0, 0.6), (0.05, 0.5))
            dup = np.flatnonzero(rng.random(n) < 0.1)
            rows[dup] = jitter(rng, rows[rng.integers(n, size=len(dup))], (0.05, 0.2))
            out.write(rows.tobytes())
            written += n
    path.with_suffix(".tmp").rename(path)
    print(f"wrote {total} rows in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def read_rows(path: Path, start: int, count: int) -> np.ndarray:
    rows: np.ndarray = np.fromfile(path, dtype=np.float32, count=count * DIM, offset=start * DIM * 4)
    return rows.reshape(-1, DIM)


def queries(work: Path, rows: Path, n: int, emb: dict[str, np.ndarray]) -> Path:
    """Query vectors, their kind, and the exact top-GT_K among the first n rows."""
    path = work / f"queries_{n}.npz"
    if path.exists():
        return path
    rng = np.random.default_rng(SEED + n)
    picked = np.sort(rng.choice(np.arange(len(emb["held_q"]), n), size=1000, replace=False))
    near_src = np.concatenate([read_rows(rows, int(i), 1) for i in picked])
    near = jitter(rng, near_src, (0.1, 0.2))
    far = np.concatenate([emb["far"], mixtures(rng, emb["base"], 1000 - len(emb["far"]),
                                               (0.5, 1.0), (0.8, 1.2))])
    vectors = np.concatenate([near, far, emb["held_p"]])
    kinds = np.array(["near"] * len(near) + ["far"] * len(far) + ["paraphrase"] * len(emb["held_p"]))
    started = time.perf_counter()
    best_s = np.full((len(vectors), GT_K), -np.inf, dtype=np.float32)
    best_i = np.full((len(vectors), GT_K), -1, dtype=np.int64)
    for start in range(0, n, GT_CHUNK):
        block = read_rows(rows, start, min(GT_CHUNK, n - start))
        scores = vectors @ block.T
        top = np.argpartition(-scores, GT_K, axis=1)[:, :GT_K]
        both_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        both_i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-both_s, axis=1)[:, :GT_K]
        best_s, best_i = np.take_along_axis(both_s, order, 1), np.take_along_axis(both_i, order, 1)
    np.savez(path, vectors=vectors, kinds=kinds, gt_ids=best_i, gt_scores=best_s, near_src=picked)
    print(f"exact top-{GT_K} of {len(vectors)} queries over {n} rows in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return path


# ---------------------------------------------------------------- one index (child process)

def build_raw(spec: dict[str, Any], rows: Path, n: int) -> tuple[Any, dict[str, float]]:
    import faiss

    from proxy import index_build
    from proxy.config import IndexConfig

    times: dict[str, float] = {}
    index_build.map_large_allocations()     # as FaissIndex does
    if spec["kind"] == "flat":
        index = index_build.make_flat(DIM)
    elif spec["kind"] == "hnsw":
        index = faiss.IndexHNSWFlat(DIM, spec.get("m", 32), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.get("ef_construction", 40)
    else:
        config = IndexConfig(storage=spec["storage"], nlist=spec.get("nlist", 0))
        nlist = index_build.nlist_for(n, config)
        index = index_build.make_ivf(DIM, nlist, config)
        # rows are drawn independently, so a block past the held-out rows is a random sample
        sample = read_rows(rows, 2000, min(n - 2000, nlist * index_build.TRAIN_POINTS_PER_LIST))
        started = time.perf_counter()
        index_build.train(index, sample)
        times["train_s"] = time.perf_counter() - started
        del sample
    started = time.perf_counter()
    for start in range(0, n, CHUNK):
        block = read_rows(rows, start, min(CHUNK, n - start))
        if spec["kind"] == "hnsw":
            index.add(block)
        else:
            index.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    times["add_s"] = time.perf_counter() - started
    return index, times


def set_probe(index: Any, spec: dict[str, Any], probe: int) -> None:
    if spec["kind"] == "ivf":
        index.nprobe = probe
    elif spec["kind"] == "hnsw":
        index.hnsw.efSearch = probe


def true_scores(rows: Path, n: int, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact cosine of each query with each returned id (-inf where none)."""
    out = np.full(ids.shape, -np.inf, dtype=np.float32)
    for start in range(0, n, CHUNK):
        block = read_rows(rows, start, min(CHUNK, n - start))
        mask = (ids >= start) & (ids < start + len(block))
        q, col = np.nonzero(mask)
        out[q, col] = np.einsum("ij,ij->i", vectors[q], block[ids[q, col] - start])
    return out


def quality(found_s: np.ndarray, found_i: np.ndarray, true: np.ndarray, gt_ids: np.ndarray,
            gt_scores: np.ndarray, kinds: np.ndarray, threshold: float) -> dict[str, Any]:
    top1: np.ndarray = (found_i[:, 0] == gt_ids[:, 0]) | (true[:, 0] >= gt_scores[:, 0] - 1e-6)
    exact_hit: np.ndarray = gt_scores[:, 0] >= threshold
    reported_hit = np.asarray((found_s >= threshold).any(axis=1))
    wrong = np.asarray(((found_s >= threshold) & (true < threshold)).any(axis=1))
    valid: np.ndarray = found_i >= 0
    out: dict[str, Any] = {
        "recall_at_1": float(top1.mean()),
        # the queries the cache decides on: those with a true neighbour above the threshold
        "recall_at_1_hits": float(top1[exact_hit].mean()) if exact_hit.any() else None,
        "hit_recall": float(reported_hit[exact_hit].mean()) if exact_hit.any() else None,
        "exact_hits": int(exact_hit.sum()),
        "false_hits": int((reported_hit & ~exact_hit).sum()),
        "above_threshold_wrong": int(wrong.sum()),
        "max_score_error": float(np.abs(found_s[valid] - true[valid]).max()),
    }
    for kind in ("near", "far", "paraphrase"):
        sel = kinds == kind
        out[kind] = {"recall_at_1": float(top1[sel].mean()), "exact_hits": int(exact_hit[sel].sum()),
                     "hit_recall": float(reported_hit[sel & exact_hit].mean()) if (sel & exact_hit).any()
                     else None, "reported_hits": int(reported_hit[sel].sum())}
    return out


def percentiles(wall: list[float], cpu: list[float]) -> dict[str, float]:
    """Wall time (what a request waits, scheduler stalls of a busy machine included) and CPU
    time (what the search costs, the figure that carries over to a quiet machine)."""
    ms, cpu_ms = np.asarray(wall) * 1000, np.asarray(cpu) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)), "cpu_p99_ms": float(np.percentile(cpu_ms, 99))}


def latency(fn: Any, vectors: np.ndarray) -> dict[str, float]:
    wall, cpu = [], []
    for row in vectors:
        started, started_cpu = time.perf_counter(), time.thread_time()
        fn(row)
        cpu.append(time.thread_time() - started_cpu)
        wall.append(time.perf_counter() - started)
    return percentiles(wall, cpu)


def child(args: argparse.Namespace) -> dict[str, Any]:
    spec = json.loads(args.spec)
    rows, n = Path(args.rows), args.n
    with np.load(args.queries) as loaded:
        vectors, kinds = loaded["vectors"], loaded["kinds"]
        gt_ids, gt_scores = loaded["gt_ids"], loaded["gt_scores"]
    import faiss  # noqa: F401  (its import is part of the baseline)

    from proxy import index_build  # noqa: F401

    result: dict[str, Any] = {"n": n, "spec": spec, "load_before": loadavg(),
                              "baseline_rss_mib": proc_kib("VmRSS") / 1024}
    if spec["kind"] == "adapter":
        result.update(asyncio.run(run_adapter(spec, rows, n, vectors, kinds, gt_ids, gt_scores,
                                              args.threshold)))
    else:
        index, times = build_raw(spec, rows, n)
        result.update(times)
        result["rss_after_build_mib"] = proc_kib("VmRSS") / 1024
        result["probes"] = []
        for probe in spec.get("probes", [0]):
            set_probe(index, spec, probe)
            k = 4
            # an exact search of 1M rows takes ~100 ms: a few hundred single queries say enough
            lat = latency(lambda row, k=k: index.search(row.reshape(1, -1), k),
                          vectors[::max(1, len(vectors) // spec.get("single_max", len(vectors)))])
            started = time.perf_counter()
            found_s, found_i = index.search(vectors, k)
            batched_ms = (time.perf_counter() - started) * 1000 / len(vectors)
            true = true_scores(rows, n, vectors, found_i)
            result["probes"].append({"probe": probe, "single": lat, "batched_ms_per_query": batched_ms,
                                     **quality(found_s, found_i, true, gt_ids, gt_scores, kinds,
                                               args.threshold)})
    result["vm_hwm_mib"] = proc_kib("VmHWM") / 1024
    result["load_after"] = loadavg()
    return result


async def run_adapter(spec: dict[str, Any], rows: Path, n: int, vectors: np.ndarray, kinds: np.ndarray,
                      gt_ids: np.ndarray, gt_scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """The proxy's path: FaissIndex with the config, fed 10k at a time like a start-up rebuild,
    searched one query at a time through its executor; keys are 64 hex digits like the cache's
    SHA-256 keys (the row number, so no lookup table skews the memory figure)."""
    from proxy.config import IndexConfig
    from proxy.index import FaissIndex

    stages: list[tuple[str, float]] = []
    started = time.perf_counter()
    index = FaissIndex(DIM, config=IndexConfig(**spec.get("config", {})),
                       build_hook=lambda s: stages.append((s, round(time.perf_counter() - started, 1))))
    for start in range(0, n, 10_000):     # the batch of SemanticCache.rebuild_index
        block = read_rows(rows, start, min(10_000, n - start))
        await index.add_many(("scope", format(start + i, "064x"), row) for i, row in enumerate(block))
    fed = time.perf_counter() - started
    await index.settled()
    built = time.perf_counter() - started
    k = 4
    found_s = np.full((len(vectors), k), -np.inf, dtype=np.float32)
    found_i = np.full((len(vectors), k), -1, dtype=np.int64)
    wall, cpu = [], []
    for q, row in enumerate(vectors):
        t0, cpu0 = time.perf_counter(), time.process_time()   # the loop's and the index thread's
        neighbours = await index.search("scope", row, k)
        cpu.append(time.process_time() - cpu0)
        wall.append(time.perf_counter() - t0)
        for col, neighbour in enumerate(neighbours):
            found_s[q, col], found_i[q, col] = neighbour.score, int(neighbour.key, 16)
    true = true_scores(rows, n, vectors, found_i)
    out = {"feed_s": fed, "build_s": built, "stages": stages, "kinds": await index.kinds(),
           "config": IndexConfig(**spec.get("config", {})).model_dump(),
           "rss_after_build_mib": proc_kib("VmRSS") / 1024,
           "probes": [{"probe": IndexConfig(**spec.get("config", {})).nprobe,
                       "single": percentiles(wall, cpu),
                       **quality(found_s, found_i, true, gt_ids, gt_scores, kinds, threshold)}]}
    await index.close()
    return out


# ---------------------------------------------------------------- driver

VARIANTS: dict[str, dict[str, Any]] = {
    "flat": {"kind": "flat", "single_max": 300},
    "ivf-float32": {"kind": "ivf", "storage": "float32", "probes": [8, 16, 32]},
    "ivf-float16": {"kind": "ivf", "storage": "float16", "probes": [8, 16, 32]},
    "ivf-sq8": {"kind": "ivf", "storage": "sq8", "probes": [8, 16, 32]},
    # not the proxy's (FAISS HNSW cannot remove ids): a reference; its build is slow, so <= 200k
    "hnsw32-float32": {"kind": "hnsw", "m": 32, "probes": [32, 64], "max_n": 200_000},
    "adapter": {"kind": "adapter"},
}


def summary(result: dict[str, Any]) -> str:
    lines = []
    for probe in result["probes"]:
        single = probe["single"]
        lines.append(
            f"n={result['n']:>8} {result['name']:<15} probe={probe['probe']:<3} "
            f"p50={single['p50_ms']:.3f} p99={single['p99_ms']:.3f} ms "
            f"cpu p50={single['cpu_p50_ms']:.3f} p99={single['cpu_p99_ms']:.3f} ms "
            f"batched={probe.get('batched_ms_per_query', float('nan')):.3f} ms/q "
            f"r@1={probe['recall_at_1']:.4f} r@1(hits)={probe['recall_at_1_hits']:.4f} "
            f"hit_recall={probe['hit_recall']:.4f} para={probe['paraphrase']['hit_recall']:.4f} "
            f"near={probe['near']['hit_recall']:.4f} false={probe['false_hits']} "
            f"err={probe['max_score_error']:.4f} hwm={result['vm_hwm_mib']:.0f} MiB "
            f"base={result['baseline_rss_mib']:.0f} MiB "
            f"train={result.get('train_s', 0):.1f}s add={result.get('add_s', result.get('build_s', 0)):.1f}s "
            f"load={result['load_before']:.2f}/{result['load_after']:.2f}")
    return "\n".join(lines)


def _setting(item: str) -> tuple[str, Any]:
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--variants", default="flat,ivf-float32,ivf-float16,ivf-sq8,adapter")
    parser.add_argument("--work", default=str(ROOT / "data" / "index_bench"),
                        help="cache of embeddings, rows and ground truth (reused between runs)")
    parser.add_argument("--total", type=int, default=1_000_000,
                        help="rows generated; every size is a prefix of the same rows")
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--out", default=str(HERE / "results" / "index_bench.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--queries", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    emb = embeddings(work)
    rows = dataset(work, max(args.total, *sizes), emb)
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        qpath = queries(work, rows, n, emb)
        for name in args.variants.split(","):
            spec = {"name": name, **VARIANTS[name.split("@")[0]]}
            if n > spec.get("max_n", n):
                continue
            if "@" in name:          # e.g. adapter@storage=sq8:nprobe=32 or ivf-float16@nlist=1024
                extra = dict(_setting(item) for item in name.split("@", 1)[1].split(":"))
                spec.update({"config": extra} if spec["kind"] == "adapter" else extra)
            proc = subprocess.run(
                [sys.executable, "-m", "bench.index_bench", "--child", "--spec", json.dumps(spec),
                 "--rows", str(rows), "--queries", str(qpath), "--n", str(n),
                 "--threshold", str(args.threshold)],
                capture_output=True, text=True, cwd=ROOT, check=False)
            if proc.returncode != 0:
                print(f"n={n} {name}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["name"] = name
            results.append(result)
            print(summary(result), flush=True)
            out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
