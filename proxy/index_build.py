"""FAISS index shapes for one scope, chosen by its size (the policy of ``IndexConfig``).

A scope starts on an exact flat index: small, always right, and nothing to train. Past
``flat_max_entries`` it moves to an inverted-file index (IVF), whose search scans ``nprobe`` of
``nlist`` clusters instead of every vector, with its vectors stored as float32, float16 or 8-bit
scalar codes. IVF and not HNSW: the cache deletes entries all the time (eviction, TTL, feedback)
and FAISS's HNSW cannot remove an id, while IVF with a hash-table direct map removes one in
place and can still give a vector back (``reconstruct``), which a later re-training needs.

Everything here is synchronous and touches only the index it is given; the adapter decides on
which thread that happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from typing import Any

import faiss
import numpy as np

from proxy.config import IndexConfig
from proxy.ports import Vector

#: k-means wants about 40 points per cluster (FAISS warns below 39); more buys little here
TRAIN_POINTS_PER_LIST = 40
#: k-means rounds; the clusters only route searches, so a rough fit is enough (FAISS: 25)
TRAIN_ITERATIONS = 10
#: the most clusters nlist 0 picks (reached at ~260k entries): at 1M entries 2048 lists keep a
#: search near 1 ms, and going on to 4096 would mean a re-training at ~640k entries, which holds
#: two copies of the index at once (a 1.9 GiB peak, measured). Set nlist for larger scopes.
AUTO_NLIST_MAX = 2048
_STORAGE = {"float32": "Flat", "float16": "SQfp16", "sq8": "SQ8"}


def make_flat(dim: int) -> Any:
    """Exact inner product over float32, with our own int64 ids (removable)."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def kind_of(index: Any) -> str:
    return "ivf" if isinstance(index, faiss.IndexIVF) else "flat"


def auto_nlist(entries: int) -> int:
    """About 4 * sqrt(n) clusters (the usual rule), a power of two up to AUTO_NLIST_MAX, with
    enough points each to train: at least one, at most entries / TRAIN_POINTS_PER_LIST."""
    wanted = min(AUTO_NLIST_MAX, 1 << round(math.log2(max(1.0, 4 * math.sqrt(max(entries, 1))))))
    return max(1, min(wanted, entries // TRAIN_POINTS_PER_LIST))


def nlist_for(entries: int, config: IndexConfig) -> int:
    chosen = config.nlist or auto_nlist(entries)
    # a fixed nlist larger than the data can train is cut down rather than failing the build
    return max(1, min(chosen, entries // TRAIN_POINTS_PER_LIST))


def make_ivf(dim: int, nlist: int, config: IndexConfig) -> Any:
    """An untrained IVF index with ids removable in place (hash-table direct map)."""
    index: Any = faiss.index_factory(dim, f"IVF{nlist},{_STORAGE[config.storage]}",
                                     faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = TRAIN_ITERATIONS
    index.nprobe = min(config.nprobe, nlist)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
    return index


def training_ids(ids: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """The ids whose vectors train the clusters: a seeded random sample."""
    wanted = min(len(ids), nlist * TRAIN_POINTS_PER_LIST)
    if wanted == len(ids):
        return ids
    picked: np.ndarray = np.random.default_rng(seed).choice(ids, size=wanted, replace=False)
    return picked


def train(index: Any, vectors: Vector) -> None:
    # k-means on one thread: the machine's other core serves requests
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))


def reconstruct(index: Any, ids: np.ndarray) -> Vector:
    """The stored vectors of these ids (exact for flat and float32, decoded otherwise)."""
    if len(ids) == 0:
        return np.empty((0, index.d), dtype=np.float32)
    out: Vector = index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
    return out


def needs_build(index: Any, entries: int, trained_for: int, config: IndexConfig) -> bool:
    """Whether a scope of this size should get a newly trained index."""
    if config.type == "flat":
        return False
    if kind_of(index) == "flat":
        return entries > config.flat_max_entries
    # clusters trained for a much smaller scope get long and slow: re-train for the new size,
    # when that means more clusters (not once nlist has reached its fixed or largest value)
    return (config.retrain_growth > 0 and entries >= trained_for * config.retrain_growth
            and nlist_for(entries, config) > index.nlist)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


#: glibc's mallopt parameter number, and the size from which it maps allocations on their own
_M_MMAP_THRESHOLD = -3
_MMAP_FROM_BYTES = 128 * 1024


def map_large_allocations() -> None:
    """Serve every allocation of 128 KiB or more with its own mapping (glibc's default, before
    its "dynamic threshold" raises the limit to 32 MiB the first time such a block is freed).
    IVF lists grow by doubling; inside glibc's heap, the abandoned copies and unused capacity
    stay resident, so 1M float16 entries took 1.57x their code size in RSS; mapped, 1.18x
    (300k entries, docs/benchmarks.md). Process-wide, and harmless elsewhere: large blocks only."""
    mallopt = getattr(_libc(), "mallopt", None)   # glibc only
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM_BYTES)


def release_freed_memory() -> None:
    """Hand the memory of a replaced index back to the OS. An IVF index is thousands of
    medium-sized lists, which glibc serves from its heaps and keeps there when freed: without
    this, RSS stays ~40% above the live index after a swap (measured at 100k entries)."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)  # glibc only; elsewhere nothing to do
    if trim is not None:
        trim(0)
