"""Redis adapter: the ``EntryStore`` replicas share, its ``ChangeFeed``, and cross-replica ``Leases``.

Layout (``<ns>`` is ``store.namespace``, on a Redis Cluster ``{<ns>}`` so that every key of a
namespace is in one hash slot, see redis_connect.py; keys and scopes are hex digests, nothing
secret is kept)::

    <ns>:e:<key>      hash    s scope | x expires | m meta JSON | r response JSON | v float32 bytes
                              (Redis TTL = time left + a grace; reads check ``x`` on our clock)
    <ns>:lru          zset    key -> access sequence: the least recently used is evicted first
    <ns>:exp          zset    key -> expires: expired entries are purged with a delete event
    <ns>:book         hash    key -> "<size>:<scope>": what the byte budget counts
    <ns>:bytes        string  sum of the sizes in book
    <ns>:seq          string  access sequence
    <ns>:changes      stream  n | o (p put, d delete, c clear) | k key | s scope | v (1: has a vector)
    <ns>:evn          string  number of the last event, so a reader can tell when it missed some
    <ns>:lease:<key>  string  token of the replica calling the backend for key (PX lease ttl)

Each change is one Lua script (redis_lua.py). On the request path every call has a small time
budget (``asyncio.timeout``), redis-py's retries are off, and a circuit breaker skips Redis for a
while after consecutive failures: a slow, frozen or dead Redis costs at most one timeout per
breaker period, and the caller (cache.py) turns the ``StoreUnavailable`` into a miss. Background
work (rebuild scans, the change feed, flushes) uses its own connections with longer budgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from proxy.breaker import Breaker, BreakerSettings, BreakerState
from proxy.config import RedisTarget, parse_redis_url
from proxy.ports import Change, ChangeBatch, Clock, Entry, StoreStats, Vector

from . import redis_lua as lua
from .redis_codec import LoopLag, decode, encode, text, vector_row
from .redis_connect import Client, Connection, connect, keyspace

log = logging.getLogger(__name__)

T = TypeVar("T")
_GLOB = re.compile(r"([*?\[\]\\])")


class StoreUnavailable(Exception):
    """Redis did not answer in time, refused, or its breaker is open: the cache serves a miss."""


#: answers that are errors from a Redis that is up, yet mean the data cannot be reached right
#: now: a cluster without a master for the slot or still re-routing it, a Sentinel master that
#: was demoted (READONLY). They count towards the breaker like a timeout does
_OUTAGES = (ClusterError, TryAgainError, ReadOnlyError, RedisClusterException)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    #: time budget of one read on the request path (the client is waiting for it)
    op_timeout_s: float = 0.05
    #: time budget of one write (stores happen after the answer went out; flush, stats)
    write_timeout_s: float = 0.25
    connect_timeout_s: float = 0.25
    #: request-path connections per replica; a caller waits (within its budget) for a free one
    max_connections: int = 64
    #: consecutive failures that open the breaker, and how long it stays open
    breaker_failures: int = 3
    breaker_open_s: float = 2.0
    #: the change stream is trimmed to about this many events
    stream_maxlen: int = 100_000
    #: time budget of one background call (scan batch, feed read beyond its block, flush chunk)
    background_timeout_s: float = 5.0
    #: keys per SCAN step and per pipelined fetch
    scan_batch: int = 1000
    #: expired entries purged (with delete events) per put or stats call
    purge_batch: int = 100
    #: lifetime of a lease not renewed (its holder died); renewed every third of it
    lease_ttl_s: float = 10.0
    #: how long Redis keeps an entry past its expiry before deleting it by itself
    ttl_grace_s: float = 5.0
    password: str | None = None


class RedisStore:
    """``EntryStore`` and ``ChangeFeed`` over a plain Redis 7 (no modules): one server, the master
    of a Sentinel deployment, or one hash slot of a Redis Cluster."""

    def __init__(self, *, url: str | RedisTarget, namespace: str, clock: Clock, max_entries: int,
                 max_bytes: int, settings: RedisSettings | None = None, dim: int | None = None,
                 on_state: Callable[[str], None] | None = None) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self._target = parse_redis_url(url) if isinstance(url, str) else url
        self._where = self._target.describe()
        self._ns = namespace
        self._clock = clock
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._settings = settings or RedisSettings()
        self._dim = dim
        self._on_state = on_state
        self._keyspace = base = keyspace(namespace, self._target)
        self._prefix = f"{base}:e:"
        self._fixed = [f"{base}:{name}" for name in lua.FIXED_KEYS]
        self._stream = f"{base}:changes"
        self._evn = f"{base}:evn"
        self._breaker = Breaker(BreakerSettings(failures_to_open=self._settings.breaker_failures,
                                                open_s=self._settings.breaker_open_s), clock.monotonic)
        self._state = BreakerState.CLOSED
        self._last_failure = self._last_error = float("-inf")
        self._lag = LoopLag()
        self._fast: Client | None = None     # request path: tight budgets, no retries
        self._slow: Client | None = None     # background: scans, feed, flush
        self._connections: list[Connection] = []
        self._scripts: dict[tuple[str, str], Any] = {}

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        return self._ns

    @property
    def keyspace(self) -> str:
        """What every key of this store starts with (the namespace, hash-tagged on a Cluster)."""
        return self._keyspace

    @property
    def topology(self) -> str:
        return self._target.topology

    @property
    def settings(self) -> RedisSettings:
        return self._settings

    @property
    def breaker_state(self) -> str:
        return str(self._breaker.state)

    async def start(self) -> None:
        """Make the clients and check Redis once; never fails (Redis may come later)."""
        self._lag.start()
        if self._fast is None:
            s = self._settings
            self._fast = self._client(max_connections=s.max_connections,
                                      socket_timeout=max(s.op_timeout_s, s.write_timeout_s) * 2,
                                      pool_timeout=max(s.op_timeout_s, s.write_timeout_s))
            self._slow = self._client(max_connections=8, socket_timeout=s.background_timeout_s,
                                      pool_timeout=s.background_timeout_s)
        try:
            async with asyncio.timeout(self._settings.background_timeout_s):
                assert self._slow is not None
                await self._slow.ping()
                if isinstance(self._fast, RedisCluster):
                    # read the slot map now, not within the first request's budget
                    await self._fast.initialize()
            log.info("redis store at %s (%s), keys %r", self._where, self._target.topology,
                     self._keyspace + ":*")
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            log.warning("redis at %s is not answering (%s); serving misses until it does",
                        self._where, type(exc).__name__)

    async def close(self) -> None:
        await self._lag.close()
        for connection in self._connections:
            await connection.close()
        self._connections.clear()
        self._fast = self._slow = None
        self._scripts.clear()

    def _client(self, *, max_connections: int, socket_timeout: float, pool_timeout: float) -> Client:
        connection = connect(self._target, password=self._settings.password, max_connections=max_connections,
                             socket_timeout=socket_timeout, pool_timeout=pool_timeout,
                             connect_timeout=self._settings.connect_timeout_s)
        self._connections.append(connection)
        return connection.client

    def _script(self, client: Client, name: str) -> Any:
        which = "fast" if client is self._fast else "slow"
        script = self._scripts.get((which, name))
        if script is None:
            script = self._scripts[(which, name)] = client.register_script(getattr(lua, name))
        return script

    async def _run(self, client: Client, name: str, args: Sequence[Any], entry_key: str | None = None) -> Any:
        keys = [*self._fixed, entry_key] if entry_key is not None else self._fixed
        return await self._script(client, name)(
            keys=keys, args=[self._prefix, self._settings.stream_maxlen, *args], client=client)

    # -- the request path: budget + breaker -------------------------------------------------------

    async def _guarded(self, call: Callable[[Client], Awaitable[T]], budget_s: float | None = None) -> T:
        client = self._fast
        if client is None:
            raise StoreUnavailable("redis store not started")
        if not self._breaker.allow():
            raise StoreUnavailable("redis circuit breaker is open")
        try:
            # Redis gets its budget; time this process's own loop was too busy to read the
            # answer is added (it would be paid anyway, and is no reason to give up on Redis)
            async with asyncio.timeout((budget_s or self._settings.op_timeout_s) + self._lag.seconds):
                result = await call(client)
        except asyncio.CancelledError:
            self._breaker.cancel()
            raise
        except _OUTAGES as exc:
            self._failed()
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        except ResponseError as exc:
            # Redis is up and answering (out of memory, a script error): a miss, not an outage
            self._breaker.success()
            raise StoreUnavailable(f"redis: {exc}") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed()
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        self._breaker.success()
        self._report()
        return result

    def _failed(self) -> None:
        """Count a failure towards opening the breaker, once per op budget: calls that fail
        together (one stall of this process, or of Redis) are one piece of evidence, so a
        burst of concurrent timeouts does not open the breaker by itself. A half-open probe's
        failure always counts."""
        now = self._last_error = self._clock.monotonic()
        if (self._breaker.state is not BreakerState.CLOSED
                or now - self._last_failure >= self._settings.op_timeout_s):
            self._last_failure = now
            self._breaker.failure()
        self._report()

    def failed_within(self, seconds: float) -> bool:
        """Whether a request-path call failed in the last ``seconds``."""
        return self._clock.monotonic() - self._last_error < seconds

    def _report(self) -> None:
        state = self._breaker.state
        if state is self._state:
            return
        self._state = state
        if state is BreakerState.OPEN:
            log.warning("redis unavailable: circuit breaker open for %.1f s (cache calls are misses)",
                        self._settings.breaker_open_s)
        elif state is BreakerState.CLOSED:
            log.info("redis answering again: circuit breaker closed")
        if self._on_state is not None:
            self._on_state(str(state))

    # -- EntryStore -------------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        fields = await self._guarded(lambda c: self._run(c, "GET", [key], self._prefix + key))
        entry = decode(fields)
        # the entry must be the one asked for: a stray value can cost a hit, never give a wrong one
        if entry is None or entry.key != key or entry.expired(self._clock.time()):
            return None
        return entry

    async def put(self, entry: Entry) -> list[Entry]:
        """Store ``entry``; returns the entry it replaced, then those evicted, oldest first.

        An entry larger than ``max_bytes``, or already expired, is refused (``[]``)."""
        if entry.vector is not None and self._dim is not None and entry.vector.size != self._dim:
            raise ValueError(f"vector has dimension {entry.vector.size}, the store expects {self._dim}")
        meta, response, vector, size = encode(entry)
        now = self._clock.time()
        if size > self._max_bytes or entry.expired(now):
            return []
        ttl_ms = max(1, int((entry.expires - now + self._settings.ttl_grace_s) * 1000))
        args = [entry.key, entry.scope, meta, response, vector, size, repr(now), repr(entry.expires),
                ttl_ms, self._max_entries, self._max_bytes, self._settings.purge_batch]
        gone = await self._guarded(lambda c: self._run(c, "PUT", args, self._prefix + entry.key),
                                   self._settings.write_timeout_s)
        return [e for e in map(decode, gone) if e is not None]

    async def delete(self, key: str) -> Entry | None:
        return decode(await self._guarded(lambda c: self._run(c, "DELETE", [key], self._prefix + key),
                                           self._settings.write_timeout_s))

    async def clear(self) -> int:
        """Forget every entry of the namespace and tell every replica's index (admin flush).
        ``StoreUnavailable`` when Redis is known to be away or does not answer."""
        if self._breaker.state is BreakerState.OPEN:
            raise StoreUnavailable("redis circuit breaker is open")
        try:
            return await self._clear(self._need_slow())
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc

    async def _clear(self, client: Client) -> int:
        total, first = 0, True
        while True:
            async with asyncio.timeout(self._settings.background_timeout_s):
                n = int(await self._run(client, "CLEAR_CHUNK", ["1" if first else "0", 500]))
            first = False
            total += n
            if n == 0:
                break
        # values whose bookkeeping is gone (a partial restore, say) go too
        async for keys in self._scan_keys(client):
            async with asyncio.timeout(self._settings.background_timeout_s):
                await client.delete(*keys)
        return total

    async def stats(self) -> StoreStats:
        entries, size = await self._guarded(
            lambda c: self._run(c, "STATS", [repr(self._clock.time()), self._settings.purge_batch]),
            self._settings.write_timeout_s)
        return StoreStats(entries=int(entries), bytes=int(size), max_entries=self._max_entries,
                          max_bytes=self._max_bytes)

    async def scan(self) -> AsyncIterator[Entry]:
        """Every live entry (SCAN + pipelined HMGET in batches)."""
        client = self._need_slow()
        async for keys in self._scan_keys(client):
            async with asyncio.timeout(self._settings.background_timeout_s):
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(key, "m", "r", "v")
                rows = await pipe.execute()
            now = self._clock.time()
            for row in rows:
                entry = decode(row)
                if entry is not None and not entry.expired(now):
                    yield entry

    # -- ChangeFeed -------------------------------------------------------------------------------

    async def position(self) -> str:
        client = self._need_slow()
        async with asyncio.timeout(self._settings.background_timeout_s):
            last, n = await self._run(client, "POSITION", [])
        return f"{text(last)} {int(n)}"

    async def read(self, after: str, *, block_s: float, count: int) -> ChangeBatch:
        """Changes after ``after`` (``"<stream id> <event number>"``); ``reset`` when events were
        lost in between (trimmed away while this reader was behind, or Redis flushed/replaced)."""
        client = self._need_slow()
        last_id, _, number = after.partition(" ")
        last_n = int(number or 0)
        async with asyncio.timeout(block_s + self._settings.background_timeout_s):
            got: Any = await client.xread({self._stream: last_id}, count=count,
                                          block=max(1, int(block_s * 1000)))
            _raise_if_cancelled()
            if not got:
                # nothing new: make sure the stream is the one we were reading
                current = int(await client.get(self._evn) or 0)
                return ChangeBatch(after, reset=current < last_n)
            events: list[tuple[bytes, dict[bytes, bytes]]] = got[0][1]
            changes: list[Change] = []
            wanted: list[int] = []
            for event_id, fields in events:
                n = int(fields[b"n"])
                if n != last_n + 1:
                    log.warning("change feed skipped from event %d to %d: rebuilding the index", last_n, n)
                    return ChangeBatch(after, reset=True)
                last_n, last_id = n, text(event_id)
                op = fields[b"o"]
                if op == b"c":
                    changes.append(Change("clear"))
                    continue
                key, scope = text(fields[b"k"]), text(fields[b"s"])
                if op == b"p" and fields.get(b"v") == b"1":
                    wanted.append(len(changes))
                    changes.append(Change("put", scope, key))
                elif op == b"p":
                    changes.append(Change("put", scope, key, None))
                else:
                    changes.append(Change("delete", scope, key))
            if wanted:
                pipe = client.pipeline(transaction=False)
                for i in wanted:
                    pipe.hmget(self._prefix + changes[i].key, "s", "x", "v")
                rows = await pipe.execute()
                now = self._clock.time()
                for i, row in zip(wanted, rows, strict=True):
                    found = vector_row(row, now)
                    change = changes[i]
                    if found is not None and found[0] == change.scope:
                        changes[i] = Change("put", change.scope, change.key, found[1])
                    else:  # gone or replaced since: a later event says what became of it
                        changes[i] = Change("delete", change.scope, change.key)
        return ChangeBatch(f"{last_id} {last_n}", tuple(changes))

    async def vectors(self, batch: int = 1000) -> AsyncIterator[list[tuple[str, str, Vector]]]:
        client = self._need_slow()
        out: list[tuple[str, str, Vector]] = []
        async for keys in self._scan_keys(client, batch):
            async with asyncio.timeout(self._settings.background_timeout_s):
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.hmget(key, "s", "x", "v")
                rows = await pipe.execute()
            now = self._clock.time()
            for key, row in zip(keys, rows, strict=True):
                found = vector_row(row, now)
                if found is not None:
                    out.append((found[0], text(key)[len(self._prefix):], found[1]))
            if len(out) >= batch:
                yield out
                out = []
        if out:
            yield out

    # -- helpers ----------------------------------------------------------------------------------

    def _need_slow(self) -> Client:
        if self._slow is None:
            raise StoreUnavailable("redis store not started")
        return self._slow

    async def _scan_keys(self, client: Client, batch: int | None = None) -> AsyncIterator[list[bytes]]:
        match = _GLOB.sub(r"\\\1", self._prefix) + "*"
        cursor: int = 0
        where: dict[str, Any] = {}
        if isinstance(client, RedisCluster):
            # SCAN reads one node: the one serving the namespace's slot (looked up once per scan;
            # a slot moved while scanning is not followed, see docs/scaling.md)
            async with asyncio.timeout(self._settings.background_timeout_s):
                await client.initialize()
            where["target_nodes"] = client.get_node_from_key(self._prefix)
        while True:
            async with asyncio.timeout(self._settings.background_timeout_s):
                step: Any = await client.scan(cursor, match=match, count=batch or self._settings.scan_batch,
                                              **where)
            position, found = step
            if isinstance(position, dict):  # a cluster's answer: {node name: cursor}
                position = next(iter(position.values()))
            cursor, keys = int(position), list(found)
            if keys:
                yield keys
            if cursor == 0:
                return


class RedisLeases:
    """``Leases`` over the store's Redis: ``SET NX PX`` with a token, renewed while held.

    Without Redis (breaker open, timeout) ``acquire`` says yes: each replica then calls the
    backend itself, single-flight within a replica still holds."""

    def __init__(self, store: RedisStore, *, ttl_s: float | None = None) -> None:
        self._store = store
        self._ttl_s = ttl_s or store.settings.lease_ttl_s
        self._owner = secrets.token_hex(8)
        self._held: dict[str, tuple[str, asyncio.Task[None]]] = {}

    def _key(self, key: str) -> str:
        # in the store's keyspace: the RENEW and RELEASE scripts touch it with the fixed keys
        return f"{self._store.keyspace}:lease:{key}"

    async def acquire(self, key: str) -> bool:
        if key in self._held:
            return True
        if self._store.failed_within(self._store.settings.breaker_open_s):
            return True  # Redis is struggling: no cross-replica wait on top of that
        token = f"{self._owner}:{secrets.token_hex(4)}"
        ttl_ms = max(1, int(self._ttl_s * 1000))
        try:
            won = await self._store._guarded(lambda c: c.set(self._key(key), token, nx=True, px=ttl_ms))
        except StoreUnavailable:
            return True
        if not won:
            return False
        if key in self._held:  # another acquire of this replica got there first
            return True
        self._held[key] = (token, asyncio.create_task(self._renew(key, token), name="lease-renew"))
        return True

    async def release(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        token, task = held
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(StoreUnavailable):
            await self._store._guarded(lambda c: self._store._run(c, "RELEASE", [token], self._key(key)),
                                       self._store.settings.write_timeout_s)

    async def close(self) -> None:
        for key in list(self._held):
            await self.release(key)

    async def _renew(self, key: str, token: str) -> None:
        ttl_ms = max(1, int(self._ttl_s * 1000))
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                kept = await self._store._guarded(
                    lambda c: self._store._run(c, "RENEW", [token, ttl_ms], self._key(key)),
                    self._store.settings.write_timeout_s)
            except StoreUnavailable:
                continue
            if not kept:
                return  # lost (expired while Redis was away): another replica may call too


def _raise_if_cancelled() -> None:
    """redis-py 8 can end a blocking read cancelled from outside with an empty answer instead of
    CancelledError (seen with XREAD BLOCK); a cancelled caller must still stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
