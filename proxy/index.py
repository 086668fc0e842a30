"""FAISS adapter for the VectorIndex port.

Every scope gets its own exact inner-product index, so a search can only ever see vectors of
the scope it names: isolation holds by construction, not by filtering results. FAISS indexes are
not safe for concurrent add and search, so every call runs on one thread this adapter owns;
that also keeps the id maps consistent with FAISS without a lock, and orders operations as
they were submitted (an add followed by a search sees the add).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import faiss
import numpy as np

from proxy.ports import Neighbour, Vector

log = logging.getLogger(__name__)

T = TypeVar("T")
SearchCallback = Callable[[float], None]


class IndexClosed(RuntimeError):
    pass


@dataclass(slots=True, eq=False)
class _Partition:
    index: Any                      # faiss.IndexIDMap2 over IndexFlatIP
    keys: dict[int, str] = field(default_factory=dict)


class FaissIndex:
    """Exact cosine search (inner product of unit vectors), partitioned by scope."""

    def __init__(self, dim: int | None = None, *, executor: Executor | None = None,
                 on_search: SearchCallback | None = None) -> None:
        if dim is not None and dim <= 0:
            raise ValueError("dim must be positive")
        # Left open, the first vector fixes it: the app builds the index before the model loads.
        self._dim = dim
        self._owns_executor = executor is None
        # A shared executor must be single-threaded too, or adds and searches could overlap.
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="faiss")
        self._on_search = on_search
        self._partitions: dict[str, _Partition] = {}
        self._where: dict[str, tuple[str, int]] = {}  # key -> (scope, FAISS id)
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
        await self._call(self._add_sync, list(items))

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

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):
            # Queued behind any running call, so this waits for it without blocking the loop.
            await loop.run_in_executor(self._executor, self._clear_sync)
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise IndexClosed("index is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # Everything below runs on the index thread only.

    def _row(self, vector: Vector) -> Vector:
        row = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if self._dim is not None and row.shape[1] != self._dim:
            raise ValueError(f"vector has {row.shape[1]} dimensions, the index {self._dim}")
        if row.shape[1] == 0:
            raise ValueError("vector is empty")
        return row

    def _add_sync(self, items: list[tuple[str, str, Vector]]) -> None:
        latest: dict[str, tuple[str, Vector]] = {}
        for scope, key, vector in items:
            latest[key] = (scope, self._row(vector))  # validate all before changing anything
        dims = {row.shape[1] for _, row in latest.values()}
        if len(dims) > 1:
            raise ValueError(f"vectors of different sizes in one add: {sorted(dims)}")
        if not latest:
            return
        dim = self._dim = dims.pop()
        self._discard(latest)
        by_scope: dict[str, list[tuple[str, Vector]]] = {}
        for key, (scope, row) in latest.items():
            by_scope.setdefault(scope, []).append((key, row))
        for scope, rows in by_scope.items():
            part = self._partitions.get(scope)
            if part is None:
                part = self._partitions[scope] = _Partition(
                    faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))
            ids = np.arange(self._next_id, self._next_id + len(rows), dtype=np.int64)
            self._next_id += len(rows)
            part.index.add_with_ids(np.concatenate([row for _, row in rows]), ids)
            for ident, (key, _) in zip(ids.tolist(), rows, strict=True):
                part.keys[ident] = key
                self._where[key] = (scope, ident)
            self._count += len(rows)

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
            self._count -= len(ids)
            if not part.keys:
                del self._partitions[scope]

    def _search_sync(self, scope: str, vector: Vector, k: int) -> list[Neighbour]:
        query = self._row(vector)
        part = self._partitions.get(scope)
        if part is None or k <= 0:
            return []
        scores, ids = part.index.search(query, min(k, len(part.keys)))
        # Float error can put an identical vector a hair above 1.
        return [Neighbour(part.keys[ident], min(score, 1.0))
                for score, ident in zip(scores[0].tolist(), ids[0].tolist(), strict=True)
                if ident != -1]

    def _clear_sync(self) -> None:
        self._partitions.clear()
        self._where.clear()
        self._count = 0
