"""Exact-then-semantic lookup and gated store, over the ports only.

Any fault below this line (store, index, embedder, a timeout) becomes a miss: the cache can make
a request faster, never make it fail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .cachekey import Plan
from .guards import NO_GUARDS, Guards, check
from .ports import Clock, Embedder, Entry, EntryStore, Metrics, StoreStats, Vector, VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry
    kind: str                 # "exact" | "semantic"
    score: float              # 1.0 for exact hits


@dataclass(frozen=True, slots=True)
class Miss:
    vector: Vector | None     # the embedding computed for the lookup, reused when storing
    best: float | None        # best similarity seen in scope, for the histogram
    reason: str | None = None  # why semantic search was skipped ("too_long", "error", ...)
    refused: str | None = None  # the guard that refused a candidate above the threshold


Lookup = Hit | Miss


@dataclass(frozen=True, slots=True)
class CacheSettings:
    ttl_s: float
    top_k: int
    max_entry_bytes: int
    store_finish_reasons: frozenset[str]
    lookup_timeout_s: float


class SemanticCache:
    def __init__(self, *, store: EntryStore, index: VectorIndex, embedder: Embedder | None,
                 clock: Clock, metrics: Metrics, settings: CacheSettings) -> None:
        self._store = store
        self._index = index
        self._embedder = embedder
        self._clock = clock
        self._metrics = metrics
        self._settings = settings

    @property
    def semantic_available(self) -> bool:
        return self._embedder is not None

    async def lookup(self, plan: Plan, threshold: float, guards: Guards = NO_GUARDS) -> Lookup:
        try:
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                return await self._lookup(plan, threshold, guards)
        except Exception as exc:  # a broken cache is a miss, never a failed request
            self._metrics.cache_error("lookup")
            log.warning("cache lookup failed, serving as a miss: %s", type(exc).__name__)
            return Miss(vector=None, best=None, reason="error")

    async def _lookup(self, plan: Plan, threshold: float, guards: Guards) -> Lookup:
        entry = await self._store.get(plan.key)
        if entry is not None and entry.scope == plan.scope:
            return Hit(entry, "exact", 1.0)
        if plan.text is None or self._embedder is None:
            return Miss(vector=None, best=None)
        embedding = await self._embedder.embed([plan.text])
        if embedding.tokens[0] > self._embedder.max_tokens:
            # the model would compare a truncated prompt: two long prompts that differ only
            # after the window would look identical
            return Miss(vector=None, best=None, reason="too_long")
        vector = embedding.vectors[0]
        neighbours = await self._index.search(plan.scope, vector, self._settings.top_k)
        best = neighbours[0].score if neighbours else None
        refused = None
        for neighbour in neighbours:
            if neighbour.score < threshold:
                break
            candidate = await self._store.get(neighbour.key)
            if candidate is None:
                await self._index.remove(plan.scope, neighbour.key)
                continue
            # the store is the truth: an index that lags behind costs a hit, never a wrong answer
            if candidate.scope != plan.scope or candidate.text is None:
                continue
            guard = check(plan.text, candidate.text, guards)
            if guard is not None:
                refused = refused or guard
                continue
            return Hit(candidate, "semantic", neighbour.score)
        return Miss(vector=vector, best=best, refused=refused)

    def admissible(self, response: Mapping[str, Any]) -> str | None:
        """Why an answer must not be stored, or None when it may be."""
        if "error" in response:
            return "error"
        choices = response.get("choices")
        if not isinstance(choices, list) or len(choices) != 1:
            return "choices"
        choice = choices[0]
        if not isinstance(choice, Mapping):
            return "choices"
        if choice.get("finish_reason") not in self._settings.store_finish_reasons:
            return "finish_reason"
        message = choice.get("message")
        if isinstance(message, Mapping) and message.get("tool_calls"):
            return "tool_calls"
        return None

    async def store(self, plan: Plan, *, model: str, route: str, response: Mapping[str, Any],
                    vector: Vector | None, embed: bool = True) -> str:
        """Store a complete answer if the write gate admits it; returns the outcome label.

        Without a vector from the lookup the text is embedded here, unless ``embed`` is False
        (the lookup already found it too long to compare)."""
        refused = self.admissible(response)
        if refused is not None:
            return refused
        try:
            size = len(orjson.dumps(response))
            if size > self._settings.max_entry_bytes:
                return "too_large"
            if embed and plan.text is not None and vector is None and self._embedder is not None:
                embedding = await self._embedder.embed([plan.text])
                if embedding.tokens[0] <= self._embedder.max_tokens:
                    vector = embedding.vectors[0]
            now = self._clock.time()
            entry = Entry(key=plan.key, scope=plan.scope, model=model, route=route,
                          text=plan.text if vector is not None else None, vector=vector,
                          response=response, created=now, expires=now + self._settings.ttl_s)
            dropped = await self._store.put(entry)
            for old in dropped:
                if old.vector is not None:
                    await self._index.remove(old.scope, old.key)
            if vector is not None and await self._store.get(plan.key) is not None:
                await self._index.add(plan.scope, plan.key, vector)
            await self._report_size()
            return "stored"
        except Exception as exc:
            self._metrics.cache_error("store")
            log.warning("cache store failed: %s", type(exc).__name__)
            return "error"

    async def delete(self, key: str) -> bool:
        entry = await self._store.delete(key)
        if entry is not None and entry.vector is not None:
            await self._index.remove(entry.scope, entry.key)
        await self._report_size()
        return entry is not None

    async def clear(self) -> int:
        count = await self._store.clear()
        await self._index.clear()
        await self._report_size()
        return count

    async def stats(self) -> StoreStats:
        return await self._store.stats()

    async def rebuild_index(self) -> int:
        """Load every stored vector into the index (start-up)."""
        batch: list[tuple[str, str, Vector]] = []
        total = 0
        async for entry in self._store.scan():
            if entry.vector is None:
                continue
            batch.append((entry.scope, entry.key, entry.vector))
            if len(batch) >= 10_000:
                await self._index.add_many(batch)
                total += len(batch)
                batch = []
        if batch:
            await self._index.add_many(batch)
            total += len(batch)
        await self._report_size()
        return total

    async def _report_size(self) -> None:
        stats = await self._store.stats()
        self._metrics.cache_size(stats.entries, stats.bytes)
