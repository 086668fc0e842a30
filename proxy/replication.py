"""Keeps this replica's vector index in step with a store shared by several replicas.

At start (and whenever the feed says changes were lost) the follower takes the feed's position,
clears the index and reloads every stored vector, then applies the feed's inserts and deletes from
that position on, so nothing that changed during the scan is missed. It runs as one tracked task
that never gives up: when the store is away it retries with backoff and carries on (or rebuilds)
when it is back. The index can only lag, never lie: the cache checks every candidate against the
store before answering with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from .ports import ChangeFeed, Vector, VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FollowSettings:
    #: how long one read waits for new changes
    block_s: float = 1.0
    #: most changes applied per read
    read_count: int = 512
    #: vectors per rebuild batch, and how often the rebuild logs its progress
    rebuild_batch: int = 1000
    log_every: int = 10_000
    #: reconnect backoff: first delay, cap
    backoff_s: float = 0.1
    backoff_max_s: float = 5.0


class IndexFollower:
    def __init__(self, *, feed: ChangeFeed, index: VectorIndex, settings: FollowSettings | None = None,
                 on_status: Callable[[str], None] | None = None) -> None:
        self._feed = feed
        self._index = index
        self._settings = settings or FollowSettings()
        self._on_status = on_status
        self._position: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._attempted = asyncio.Event()
        self._status = ""
        self._stopping = False
        self.rebuilds = 0
        self.applied = 0
        self.last_rebuild_s = 0.0

    @property
    def synced(self) -> bool:
        """Whether the index has been rebuilt at least once and the feed is being followed."""
        return self._position is not None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="index-follower")

    async def wait_started(self, within_s: float) -> bool:
        """Wait until the first rebuild finished, or failed once (the store is away), or ``within_s``;
        True when the index is in sync."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._attempted.wait()
        return self.synced

    async def wait_synced(self, within_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._synced.wait()
        return self.synced

    async def close(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        # a client library may swallow one cancellation inside a blocking read: ask again
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    def _set_status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            if self._on_status is not None:
                self._on_status(status)

    async def _run(self) -> None:
        delay = self._settings.backoff_s
        failures = 0
        while not self._stopping:
            try:
                if self._position is None:
                    await self._rebuild()
                    self._synced.set()
                    self._attempted.set()
                    self._set_status("following")
                await self._follow()
                # also after an outage that did not cost the feed position (no rebuild)
                self._set_status("following")
                delay, failures = self._settings.backoff_s, 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self._attempted.set()
                self._set_status(f"store unavailable ({type(exc).__name__}), retrying")
                if failures == 1 or failures % 20 == 0:
                    log.warning("index follower: %s: %s; retrying in %.1f s (failure %d)",
                                type(exc).__name__, exc, delay, failures)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._settings.backoff_max_s)

    async def _rebuild(self) -> None:
        started = time.perf_counter()
        self._set_status("rebuilding")
        position = await self._feed.position()
        await self._index.clear()
        total, next_log = 0, self._settings.log_every
        async for batch in self._feed.vectors(self._settings.rebuild_batch):
            await self._index.add_many(batch)
            total += len(batch)
            if total >= next_log:
                log.info("index rebuild: %d vectors loaded (%.1f s)", total, time.perf_counter() - started)
                next_log += self._settings.log_every
        self._position = position
        self.rebuilds += 1
        self.last_rebuild_s = time.perf_counter() - started
        log.info("index rebuilt from the shared store: %d vectors in %.2f s", total, self.last_rebuild_s)

    async def _follow(self) -> None:
        assert self._position is not None
        batch = await self._feed.read(self._position, block_s=self._settings.block_s,
                                      count=self._settings.read_count)
        if batch.reset:
            log.warning("index follower lost its place in the change feed; rebuilding the index")
            self._position = None
            return
        adds: list[tuple[str, str, Vector]] = []
        for change in batch.changes:
            if change.op == "put" and change.vector is not None:
                adds.append((change.scope, change.key, change.vector))
                continue
            # keep the order: earlier inserts land before a later delete or clear
            if adds:
                await self._index.add_many(adds)
                adds = []
            if change.op == "clear":
                await self._index.clear()
            else:
                await self._index.remove(change.scope, change.key)
        if adds:
            await self._index.add_many(adds)
        self.applied += len(batch.changes)
        self._position = batch.position
