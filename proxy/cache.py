"""Exact-then-semantic lookup and gated store, over the ports only.

Any fault below this line (store, index, embedder, a timeout) becomes a miss: the cache can make
a request faster, never make it fail.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .cachekey import Plan
from .guards import ALL_GUARDS, NO_GUARDS, Guards, check, fired
from .ports import Clock, Embedder, Entry, EntryStore, Metrics, StoreStats, Vector, VectorIndex
from .verifier_floors import FeedbackFloors

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
class Candidate:
    """One neighbour of an explained request, as the lookup would judge it."""

    key: str
    score: float
    text: str | None          # the cached prompt (admin output only)
    above_threshold: bool
    refused_by: str | None    # the first enabled guard that refuses it (what the lookup checks)
    guards_fired: tuple[str, ...]  # every guard that fires, enabled or not
    live: bool                # False: in the index but gone from the store (or another scope)
    verifier_score: float | None = None  # P(same meaning) by the verifier, when one covers it
    floor: float | None = None  # the similarity to beat, learned from feedback on this entry


@dataclass(frozen=True, slots=True)
class Explanation:
    """What a lookup would do for a request, worked out without serving or storing anything."""

    scope: str
    key: str
    embedder: str | None
    semantic_text: bool       # whether the request takes part in semantic matching at all
    reason: str | None        # why semantic matching is off or was skipped
    exact_hit: bool
    threshold: float
    neighbours: tuple[Candidate, ...]
    decision: str             # "exact" | "semantic" | "miss"
    served_by: str | None     # the key of the entry that would answer


class RecentHits:
    """Which entry answered a request by similarity, per exact key, for a short while: a retry
    of that request with ``Cache-Control: no-cache`` soon after says the hit was wrong. Bounded:
    the oldest of ``max_items`` are forgotten first. Times are the caller's monotonic seconds."""

    def __init__(self, max_items: int = 10_000) -> None:
        self._max_items = max_items
        self._hits: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hits)

    def remember(self, key: str, entry_key: str, now: float) -> None:
        self._hits.pop(key, None)
        self._hits[key] = (entry_key, now)
        while len(self._hits) > self._max_items:
            self._hits.popitem(last=False)

    def get(self, key: str, now: float, window_s: float) -> str | None:
        """The entry that served ``key`` within the last ``window_s`` seconds, or None."""
        found = self._hits.get(key)
        if found is None:
            return None
        entry_key, at = found
        if now - at > window_s:
            del self._hits[key]
            return None
        return entry_key

    def take(self, key: str, now: float, window_s: float) -> str | None:
        """As :meth:`get`, and forget it (one retry is one piece of feedback)."""
        entry_key = self.get(key, now, window_s)
        self._hits.pop(key, None)
        return entry_key


@dataclass(frozen=True, slots=True)
class CacheSettings:
    ttl_s: float
    top_k: int
    max_entry_bytes: int
    store_finish_reasons: frozenset[str]
    lookup_timeout_s: float
    feedback_floors: int = 10_000   # per-entry floors kept (verifier_floors.py); 0: off


class SemanticCache:
    def __init__(self, *, store: EntryStore, index: VectorIndex, embedder: Embedder | None,
                 clock: Clock, metrics: Metrics, settings: CacheSettings,
                 embedders: Mapping[str, Embedder] | None = None) -> None:
        self._store = store
        self._index = index
        self._embedder = embedder
        # by model id, for plans that name one (Plan.embedder); None names the default
        self._embedders = dict(embedders or {})
        self._clock = clock
        self._metrics = metrics
        self._settings = settings
        self._floors = FeedbackFloors(settings.feedback_floors)

    @property
    def semantic_available(self) -> bool:
        return self._embedder is not None or bool(self._embedders)

    def _embedder_for(self, plan: Plan) -> Embedder | None:
        if plan.embedder is None:
            return self._embedder
        return self._embedders.get(plan.embedder)

    async def lookup(self, plan: Plan, threshold: float, guards: Guards = NO_GUARDS) -> Lookup:
        try:
            # The deadline starts now, but its timer is armed only for the semantic part: the
            # exact read is bounded by the store itself (in process: no I/O; Redis: op_timeout_s),
            # and an exact hit, the cheapest answer there is, should not pay for a timer.
            deadline = asyncio.get_running_loop().time() + self._settings.lookup_timeout_s
            entry = await self._store.get(plan.key)
            if entry is not None and entry.scope == plan.scope:
                return Hit(entry, "exact", 1.0)
            async with asyncio.timeout_at(deadline):
                return await self._semantic(plan, threshold, guards)
        except Exception as exc:  # a broken cache is a miss, never a failed request
            self._metrics.cache_error("lookup")
            log.warning("cache lookup failed, serving as a miss: %s", type(exc).__name__)
            return Miss(vector=None, best=None, reason="error")

    async def exact(self, plan: Plan) -> Entry | None:
        """The entry stored under the plan's exact key and scope, or None, also on any fault
        (a replica waiting for another replica's answer polls this)."""
        try:
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                entry = await self._store.get(plan.key)
        except Exception as exc:
            self._metrics.cache_error("lookup")
            log.debug("exact lookup failed: %s", type(exc).__name__)
            return None
        if entry is None or entry.key != plan.key or entry.scope != plan.scope:
            return None
        return entry

    async def _semantic(self, plan: Plan, threshold: float, guards: Guards) -> Lookup:
        embedder = self._embedder_for(plan)
        if plan.text is None or embedder is None:
            return Miss(vector=None, best=None)
        embedding = await embedder.embed([plan.text])
        if embedding.tokens[0] > embedder.max_tokens:
            # the model would compare a truncated prompt: two long prompts that differ only
            # after the window would look identical
            return Miss(vector=None, best=None, reason="too_long")
        return await self._search(plan, embedding.vectors[0], threshold, guards)

    async def recheck(self, plan: Plan, vector: Vector | None, threshold: float,
                      guards: Guards = NO_GUARDS) -> Hit | None:
        """Look again, without embedding, for an answer stored since the lookup began: a slow
        lookup can miss an identical or similar call that finished meanwhile."""
        try:
            async with asyncio.timeout(self._settings.lookup_timeout_s):
                entry = await self._store.get(plan.key)
                if entry is not None and entry.scope == plan.scope:
                    return Hit(entry, "exact", 1.0)
                if vector is None or plan.text is None:
                    return None
                found = await self._search(plan, vector, threshold, guards)
        except Exception as exc:
            self._metrics.cache_error("lookup")
            log.debug("cache recheck failed: %s", type(exc).__name__)
            return None
        return found if isinstance(found, Hit) else None

    async def _search(self, plan: Plan, vector: Vector, threshold: float, guards: Guards) -> Lookup:
        assert plan.text is not None
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
            guard = ("feedback" if self._floors.refuses(neighbour.key, neighbour.score)
                     else check(plan.text, candidate.text, guards, neighbour.score, plan.embedder))
            if guard is not None:
                refused = refused or guard
                continue
            self._floors.served(neighbour.key, neighbour.score)
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
            now = self._clock.time()
            entry = Entry(key=plan.key, scope=plan.scope, model=model, route=route, text=None,
                          vector=None, response=response, created=now,
                          expires=now + self._settings.ttl_s)
            embedder = self._embedder_for(plan)
            if embed and plan.text is not None and vector is None and embedder is not None:
                # a fresh answer to a question already cached (a no-cache request): same key, so
                # same scope and text, so the stored vector still holds; re-embedding would take
                # the entry out of the index for the length of a model call
                vector = await self._vector_of(plan)
            if embed and plan.text is not None and vector is None and embedder is not None:
                # the exact entry goes in before the text is embedded, so a repeat arriving
                # meanwhile is an exact hit rather than a miss or a semantic hit
                await self._put(entry)
                embedding = await embedder.embed([plan.text])
                if embedding.tokens[0] > embedder.max_tokens:
                    await self._report_size()
                    return "stored"
                vector = embedding.vectors[0]
            if vector is not None:
                entry = replace(entry, text=plan.text, vector=vector)
            await self._put(entry)
            if vector is not None and await self._store.get(plan.key) is not None:
                await self._index.add(plan.scope, plan.key, vector)
            await self._report_size()
            return "stored"
        except Exception as exc:
            self._metrics.cache_error("store")
            log.warning("cache store failed: %s", type(exc).__name__)
            return "error"

    async def _vector_of(self, plan: Plan) -> Vector | None:
        old = await self._store.get(plan.key)
        if old is None or old.vector is None or old.text != plan.text or old.scope != plan.scope:
            return None
        return old.vector

    async def _put(self, entry: Entry) -> None:
        for old in await self._store.put(entry):
            if old.vector is not None:
                await self._index.remove(old.scope, old.key)

    async def delete(self, key: str) -> bool:
        entry = await self._store.delete(key)
        if entry is not None and entry.vector is not None:
            await self._index.remove(entry.scope, entry.key)
        await self._report_size()
        return entry is not None

    async def feedback(self, key: str, kind: str, score: float | None = None) -> Entry | None:
        """A served answer was marked wrong (``kind``: explicit | retry): evict its entry, count
        it, and leave the similarity of the wrong hit (``score``, default the entry's latest
        semantic hit) as the floor its key must beat from now on. Returns the evicted entry, or
        None when it was already gone."""
        self._floors.wrong(key, score)
        entry = await self._store.delete(key)
        if entry is None:
            return None
        if entry.vector is not None:
            await self._index.remove(entry.scope, entry.key)
        self._metrics.feedback(kind)
        await self._report_size()
        return entry

    async def explain(self, plan: Plan, threshold: float, guards: Guards = NO_GUARDS,
                      k: int | None = None) -> Explanation:
        """The lookup's decision for ``plan`` with the reasons: exact match, the top ``k``
        neighbours in scope with their scores and the guards that fire. Nothing is served,
        stored or cleaned up (stale index entries are only reported)."""
        k = k or self._settings.top_k
        exact = await self._store.get(plan.key)
        exact_hit = exact is not None and exact.scope == plan.scope
        embedder = self._embedder_for(plan)
        reason = plan.bypass if plan.text is None else None
        neighbours: list[Candidate] = []
        if plan.text is not None and embedder is None:
            reason = "no_embedder"
        elif plan.text is not None and embedder is not None:
            embedding = await embedder.embed([plan.text])
            if embedding.tokens[0] > embedder.max_tokens:
                reason = "too_long"
            else:
                for found in await self._index.search(plan.scope, embedding.vectors[0], k):
                    candidate = await self._store.get(found.key)
                    live = (candidate is not None and candidate.scope == plan.scope
                            and candidate.text is not None)
                    text = candidate.text if candidate is not None else None
                    refused_by = None
                    if self._floors.refuses(found.key, found.score):
                        refused_by = "feedback"
                    elif live and text is not None:
                        refused_by = check(plan.text, text, guards, found.score, plan.embedder)
                    neighbours.append(Candidate(
                        key=found.key, score=found.score, text=text,
                        above_threshold=found.score >= threshold, refused_by=refused_by,
                        guards_fired=fired(plan.text, text, ALL_GUARDS) if text is not None else (),
                        live=live, floor=self._floors.floor(found.key),
                        verifier_score=(guards.verifier.score(plan.text, text, found.score, plan.embedder)
                                        if guards.verifier is not None and text is not None else None)))
        served_by = None
        decision = "miss"
        if exact_hit:
            decision, served_by = "exact", plan.key
        else:
            for near in neighbours:
                if not near.above_threshold:
                    break
                if near.live and near.refused_by is None:
                    decision, served_by = "semantic", near.key
                    break
        return Explanation(scope=plan.scope, key=plan.key, embedder=plan.embedder,
                           semantic_text=plan.text is not None, reason=reason, exact_hit=exact_hit,
                           threshold=threshold, neighbours=tuple(neighbours), decision=decision,
                           served_by=served_by)

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
