"""FAISS adapter for the VectorIndex port.

Every scope gets its own index, so a search can only ever see vectors of the scope it names:
isolation holds by construction, not by filtering results. FAISS indexes are not safe for
concurrent add and search, so every call on a live index runs on one thread this adapter owns;
that also keeps the id maps consistent with FAISS without a lock, and orders operations as they
were submitted (an add followed by a search sees the add).

A scope starts on an exact flat index. When it grows past ``IndexConfig.flat_max_entries`` (or an
IVF index outgrows what it was trained for), a second thread, the builder, trains a new index and
loads it with the scope's vectors, fetched in small batches from the index thread, while the old
index keeps answering. Adds and removes meanwhile go to the old index and to a log; the builder
replays the log until it is short, and the index thread applies the rest and swaps the new index
in, all in one step, so nothing added or removed during a build is lost. Scores of a compressed
index are approximate; the cache re-reads every candidate from the store before serving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from proxy import index_build
from proxy.config import IndexConfig
from proxy.ports import Neighbour, Vector

log = logging.getLogger(__name__)

T = TypeVar("T")
SearchCallback = Callable[[float], None]
#: called on the builder thread as a build reaches each stage (logs; tests pause builds with it)
BuildHook = Callable[[str], None]

#: vectors fetched from the index thread per call of a build: short, so searches interleave
FETCH_BATCH = 16_384
#: a build's log of changes this short is applied by the index thread in the swap itself
SWAP_LOG_MAX = 2_048


class IndexClosed(RuntimeError):
    pass


class _Abandoned(Exception):
    """The scope was cleared or emptied, or the index closed, while its new index was built."""


@dataclass(slots=True, eq=False)
class _Partition:
    index: Any                      # flat (IndexIDMap2 over IndexFlatIP) or IVF, see index_build
    keys: dict[int, str] = field(default_factory=dict)
    trained_for: int = 0            # entries the IVF index was trained on (0: flat)
    retry_at: int = 0               # after a failed build, the size at which to try again
    # ids added and removed while a build runs; None when none does
    added: list[int] | None = None
    removed: list[int] | None = None
    building_from: int = 0          # entries when the running build started

    @property
    def swamped(self) -> bool:
        """A build under way while the scope has grown by a quarter: a bulk load (start-up
        rebuild, follower catching up) is outrunning it. Both indexes grow with the scope until
        the swap, so without this a 1M-entry load held two 1M-entry indexes (1.9 GiB)."""
        return self.added is not None and len(self.added) > max(SWAP_LOG_MAX, self.building_from // 4)


class FaissIndex:
    """Cosine search (inner product of unit vectors), partitioned by scope, exact while small."""

    def __init__(self, dim: int | None = None, *, config: IndexConfig | None = None,
                 executor: Executor | None = None, builder: Executor | None = None,
                 on_search: SearchCallback | None = None, build_hook: BuildHook | None = None) -> None:
        if dim is not None and dim <= 0:
            raise ValueError("dim must be positive")
        if builder is not None and builder is executor:
            # a build waits on the index thread: sharing one thread would deadlock
            raise ValueError("the builder must not be the index executor")
        # Left open, the first vector fixes it: the app builds the index before the model loads.
        self._dim = dim
        self._config = config or IndexConfig()
        self._owns_executor = executor is None
        # A shared executor must be single-threaded too, or adds and searches could overlap.
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="faiss")
        self._owns_builder = builder is None
        # one build at a time: each holds a scope's vectors twice until its swap
        self._builder = builder or ThreadPoolExecutor(1, thread_name_prefix="faiss-build")
        self._on_search = on_search
        self._build_hook = build_hook
        if self._config.type != "flat":
            index_build.map_large_allocations()
        self._partitions: dict[str, _Partition] = {}
        self._where: dict[str, tuple[str, int]] = {}  # key -> (scope, FAISS id)
        self._builds: set[Future[None]] = set()
        self._next_id = 0
        self._count = 0
        self._closed = False

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def scopes(self) -> int:
        return len(self._partitions)

    def __len__(self) -> int:
        return self._count

    async def add(self, scope: str, key: str, vector: Vector) -> None:
        await self._call(self._add_sync, [(scope, key, vector)])

    async def add_many(self, items: Iterable[tuple[str, str, Vector]]) -> None:
        # Drained here, on the loop, since the iterable may read state only the loop may touch.
        swamped = await self._call(self._add_sync, list(items))
        if swamped:
            # back-pressure on a bulk load only: serving adds a few entries a second
            await self.settled()

    async def remove(self, scope: str, key: str) -> None:
        await self._call(self._remove_sync, scope, key)

    async def search(self, scope: str, vector: Vector, k: int) -> list[Neighbour]:
        started = time.perf_counter()
        found = await self._call(self._search_sync, scope, vector, k)
        if self._on_search is not None:
            try:
                self._on_search(time.perf_counter() - started)
            except Exception:
                # A metrics fault must not turn a good search into a failed lookup.
                log.exception("on_search callback failed")
        return found

    async def clear(self) -> None:
        await self._call(self._clear_sync)

    async def kinds(self) -> dict[str, int]:
        """Scopes per index kind, e.g. {"flat": 12, "ivf": 1}."""
        return await self._call(self._kinds_sync)

    async def settled(self) -> None:
        """Wait until no build is under way (a finished build may start the next one)."""
        while self._builds:
            await asyncio.wait([asyncio.wrap_future(build) for build in list(self._builds)])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):
            # Queued behind any running call, so this waits for it without blocking the loop.
            await loop.run_in_executor(self._executor, self._clear_sync)
        # A build notices at its next step that its scope is gone and stops there.
        await self.settled()
        if self._owns_builder:
            self._builder.shutdown(wait=True)
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise IndexClosed("index is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # Everything below, up to the builder's part, runs on the index thread only.

    def _row(self, vector: Vector) -> Vector:
        row = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if self._dim is not None and row.shape[1] != self._dim:
            raise ValueError(f"vector has {row.shape[1]} dimensions, the index {self._dim}")
        if row.shape[1] == 0:
            raise ValueError("vector is empty")
        return row

    def _add_sync(self, items: list[tuple[str, str, Vector]]) -> bool:
        """Add; True when a scope added to has a build under way that this add swamps."""
        latest: dict[str, tuple[str, Vector]] = {}
        for scope, key, vector in items:
            latest[key] = (scope, self._row(vector))  # validate all before changing anything
        dims = {row.shape[1] for _, row in latest.values()}
        if len(dims) > 1:
            raise ValueError(f"vectors of different sizes in one add: {sorted(dims)}")
        if not latest:
            return False
        dim = self._dim = dims.pop()
        self._discard(latest)
        by_scope: dict[str, list[tuple[str, Vector]]] = {}
        swamped = False
        for key, (scope, row) in latest.items():
            by_scope.setdefault(scope, []).append((key, row))
        for scope, rows in by_scope.items():
            part = self._partitions.get(scope)
            if part is None:
                part = self._partitions[scope] = _Partition(index_build.make_flat(dim))
            ids = np.arange(self._next_id, self._next_id + len(rows), dtype=np.int64)
            self._next_id += len(rows)
            part.index.add_with_ids(np.concatenate([row for _, row in rows]), ids)
            idents = ids.tolist()
            for ident, (key, _) in zip(idents, rows, strict=True):
                part.keys[ident] = key
                self._where[key] = (scope, ident)
            if part.added is not None:
                part.added.extend(idents)
            self._count += len(rows)
            self._maybe_build(scope, part)
            swamped = swamped or part.swamped
        return swamped

    def _remove_sync(self, scope: str, key: str) -> None:
        where = self._where.get(key)
        if where is not None and where[0] == scope:
            self._discard((key,))

    def _discard(self, keys: Iterable[str]) -> None:
        """Drop these keys wherever they are: one FAISS removal per scope touched."""
        doomed: dict[str, list[int]] = {}
        for key in keys:
            where = self._where.pop(key, None)
            if where is not None:
                doomed.setdefault(where[0], []).append(where[1])
        for scope, ids in doomed.items():
            part = self._partitions[scope]
            part.index.remove_ids(np.asarray(ids, dtype=np.int64))
            for ident in ids:
                del part.keys[ident]
            if part.removed is not None:
                part.removed.extend(ids)
            self._count -= len(ids)
            if not part.keys:
                del self._partitions[scope]

    def _search_sync(self, scope: str, vector: Vector, k: int) -> list[Neighbour]:
        query = self._row(vector)
        part = self._partitions.get(scope)
        if part is None or k <= 0:
            return []
        scores, ids = part.index.search(query, min(k, len(part.keys)))
        # Float error can put an identical vector a hair above 1; -1 pads an IVF answer that
        # found fewer than k in the clusters it scanned.
        return [Neighbour(part.keys[ident], min(score, 1.0))
                for score, ident in zip(scores[0].tolist(), ids[0].tolist(), strict=True)
                if ident != -1]

    def _clear_sync(self) -> None:
        self._partitions.clear()
        self._where.clear()
        self._count = 0

    def _kinds_sync(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in self._partitions.values():
            kind = index_build.kind_of(part.index)
            out[kind] = out.get(kind, 0) + 1
        return out

    def _maybe_build(self, scope: str, part: _Partition) -> None:
        entries = len(part.keys)
        if (part.added is not None or self._closed or entries < part.retry_at
                or not index_build.needs_build(part.index, entries, part.trained_for, self._config)):
            return
        part.added, part.removed, part.building_from = [], [], entries
        try:
            build = self._builder.submit(self._build, scope, part)
        except RuntimeError:                # the builder is shut down: the index is closing
            part.added = part.removed = None
            return
        self._builds.add(build)
        build.add_done_callback(self._builds.discard)

    def _guard(self, scope: str, part: _Partition) -> None:
        if self._closed or self._partitions.get(scope) is not part:
            raise _Abandoned

    def _fetch(self, scope: str, part: _Partition, ids: np.ndarray) -> tuple[np.ndarray, Vector]:
        """The vectors of those ids still in the scope (removed ones are in the build's log)."""
        self._guard(scope, part)
        present = np.fromiter((i for i in ids.tolist() if i in part.keys), dtype=np.int64)
        return present, index_build.reconstruct(part.index, present)

    def _take_log(self, scope: str, part: _Partition) -> tuple[np.ndarray, np.ndarray]:
        self._guard(scope, part)
        assert part.added is not None and part.removed is not None
        added = np.asarray(part.added, dtype=np.int64)
        removed = np.asarray(part.removed, dtype=np.int64)
        part.added, part.removed = [], []
        return added, removed

    def _swap(self, scope: str, part: _Partition, new: Any, trained_for: int) -> bool:
        """Apply a short log to the new index and put it in service; False: the log is long,
        the builder replays it first."""
        self._guard(scope, part)
        assert part.added is not None and part.removed is not None
        if len(part.added) + len(part.removed) > SWAP_LOG_MAX:
            return False
        added, removed = self._take_log(scope, part)
        present, vectors = self._fetch(scope, part, added)
        new.add_with_ids(vectors, present)
        new.remove_ids(removed)
        part.index, part.trained_for = new, trained_for
        part.added = part.removed = None
        self._maybe_build(scope, part)
        return True

    def _reset(self, scope: str, part: _Partition) -> None:
        if self._partitions.get(scope) is part:
            part.added = part.removed = None
            part.retry_at = 2 * len(part.keys)

    # The builder thread: it touches only the new index, and the partition through the index thread.

    def _on_index(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise _Abandoned
        try:
            call = self._executor.submit(fn, *args)
        except RuntimeError as exc:         # the index executor is shut down
            raise _Abandoned from exc
        return call.result()                # FAISS errors (RuntimeError too) fail the build

    def _stage(self, name: str) -> None:
        if self._build_hook is not None:
            self._build_hook(name)

    def _build(self, scope: str, part: _Partition) -> None:
        started = time.perf_counter()
        try:
            entries, kind = self._build_steps(scope, part)
        except _Abandoned:
            return
        except Exception:
            log.exception("building a larger index for a scope failed; it keeps its current one")
            with contextlib.suppress(RuntimeError):
                self._executor.submit(self._reset, scope, part)
            return
        log.info("a scope of %d entries moved to %s in %.1f s", entries, kind,
                 time.perf_counter() - started)

    def _build_steps(self, scope: str, part: _Partition) -> tuple[int, str]:
        assert self._dim is not None
        self._stage("start")
        ids = self._on_index(self._snapshot_ids, scope, part)
        nlist = index_build.nlist_for(len(ids), self._config)
        new = index_build.make_ivf(self._dim, nlist, self._config)
        sample = index_build.training_ids(ids, nlist)
        vectors = [self._on_index(self._fetch, scope, part, chunk)[1]
                   for chunk in _chunks(sample)]
        self._stage("train")
        index_build.train(new, np.concatenate(vectors))
        del vectors
        self._load(scope, part, new, ids)
        self._stage("loaded")
        while not self._on_index(self._swap, scope, part, new, len(ids)):
            added, removed = self._on_index(self._take_log, scope, part)
            self._load(scope, part, new, added)
            new.remove_ids(removed)
        index_build.release_freed_memory()      # the old index is gone now
        self._stage("swapped")
        return len(ids), f"ivf (nlist {nlist}, {self._config.storage})"

    def _load(self, scope: str, part: _Partition, new: Any, ids: np.ndarray) -> None:
        for chunk in _chunks(ids):
            present, vectors = self._on_index(self._fetch, scope, part, chunk)
            new.add_with_ids(vectors, present)

    def _snapshot_ids(self, scope: str, part: _Partition) -> np.ndarray:
        self._guard(scope, part)
        return np.fromiter(part.keys, dtype=np.int64, count=len(part.keys))


def _chunks(ids: np.ndarray) -> Iterable[np.ndarray]:
    for start in range(0, len(ids), FETCH_BATCH):
        yield ids[start:start + FETCH_BATCH]
