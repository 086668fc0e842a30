"""Contract every ``EntryStore`` must meet; add an implementation to ``FACTORIES`` to run it.

The tests observe a store only through the port (``scan`` is used to see what is present,
because ``get`` would reorder the LRU). The Redis store runs it on each deployment it accepts,
all real servers: one redis-server, a Sentinel deployment (master + sentinel) and a 3-master
Redis Cluster (tests/redis_server.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import pytest

from proxy.ports import Clock, Entry, EntryStore, Vector
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.redis_server import ClusterDeployment, SentinelDeployment

DIM = 8
T0 = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StoreFactory = Callable[[Clock, int, int], Awaitable[EntryStore]]
MakeStore = Callable[..., Awaitable[EntryStore]]


async def _memory_store(clock: Clock, max_entries: int, max_bytes: int) -> EntryStore:
    return MemoryStore(max_entries=max_entries, max_bytes=max_bytes, clock=clock, dim=DIM)


def _redis_store(url: str) -> StoreFactory:
    """A RedisStore on the session's real redis-server, in a namespace of its own."""
    async def make(clock: Clock, max_entries: int, max_bytes: int) -> EntryStore:
        return RedisStore(url=url, namespace=f"test-{uuid.uuid4().hex[:12]}", clock=clock,
                          max_entries=max_entries, max_bytes=max_bytes, dim=DIM)
    return make


#: a factory, or the name of the fixture with the URL of a real Redis deployment (see make_store)
FACTORIES = [pytest.param(_memory_store, id="memory"), pytest.param("redis_url", id="redis"),
             pytest.param("sentinel_url", id="redis-sentinel"),
             pytest.param("cluster_url", id="redis-cluster")]


@pytest.fixture(scope="module")
def sentinel_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis+sentinel:// to a master watched by one sentinel (failover: test_redis_topologies.py)."""
    deployment = SentinelDeployment(tmp_path_factory.mktemp("sentinel"), replica=False).start()
    yield deployment.url
    deployment.stop()


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis+cluster:// to three masters sharing the slots."""
    deployment = ClusterDeployment(tmp_path_factory.mktemp("cluster")).start()
    yield deployment.url
    deployment.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=FACTORIES)
async def make_store(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[MakeStore]:
    factory: StoreFactory = request.param
    if isinstance(request.param, str):
        factory = _redis_store(request.getfixturevalue(request.param))
    made: list[EntryStore] = []

    async def make(max_entries: int = 1000, max_bytes: int = 64 * 1024 * 1024) -> EntryStore:
        store = await factory(clock, max_entries, max_bytes)
        await store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        await store.clear()
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> EntryStore:
    return await make_store()


def unit_vector(seed: int) -> Vector:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def make_entry(key: str, clock: FakeClock, *, ttl: float = 3600.0, payload: str = "answer",
               semantic: bool = True, vector: Vector | None = None,
               message: dict[str, Any] | None = None) -> Entry:
    response: dict[str, Any] = {
        "id": f"chatcmpl-{key}", "object": "chat.completion", "model": "deepseek-chat",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": payload, **(message or {})}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    if semantic and vector is None:
        vector = unit_vector(sum(map(ord, key)))
    return Entry(key=key, scope="scope-" + key[:1], model="deepseek-chat", route="chat",
                 text=f"question {key}" if semantic else None, vector=vector if semantic else None,
                 response=response, created=clock.time(), expires=clock.time() + ttl)


async def present(store: EntryStore) -> dict[str, Entry]:
    return {entry.key: entry async for entry in store.scan()}


def assert_same(got: Entry | None, want: Entry) -> None:
    assert got is not None
    assert (got.key, got.scope, got.model, got.route, got.text) == (
        want.key, want.scope, want.model, want.route, want.text)
    assert got.response == want.response
    assert (got.created, got.expires) == (want.created, want.expires)
    assert got.size > 0
    if want.vector is None:
        assert got.vector is None
    else:
        assert got.vector is not None
        assert got.vector.dtype == np.float32 and got.vector.shape == want.vector.shape
        assert np.array_equal(got.vector.view(np.uint32), want.vector.view(np.uint32))


async def test_get_missing_is_none(store: EntryStore) -> None:
    assert await store.get("nope") is None


async def test_put_then_get(store: EntryStore, clock: FakeClock) -> None:
    semantic, exact_only = make_entry("a1", clock), make_entry("b1", clock, semantic=False)
    assert await store.put(semantic) == []
    assert await store.put(exact_only) == []
    assert_same(await store.get("a1"), semantic)
    assert_same(await store.get("b1"), exact_only)


async def test_put_same_key_replaces_and_returns_the_old_entry(store: EntryStore, clock: FakeClock) -> None:
    old, new = make_entry("k", clock, payload="old"), make_entry("k", clock, payload="new")
    await store.put(old)
    gone = await store.put(new)
    assert len(gone) == 1
    assert_same(gone[0], old)
    assert_same(await store.get("k"), new)
    stats = await store.stats()
    assert stats.entries == 1
    assert stats.bytes == sum(e.size for e in (await present(store)).values())


async def test_delete(store: EntryStore, clock: FakeClock) -> None:
    entry = make_entry("d", clock)
    await store.put(entry)
    assert_same(await store.delete("d"), entry)
    assert await store.get("d") is None
    assert await store.delete("d") is None
    assert (await store.stats()).entries == 0
    assert (await store.stats()).bytes == 0


async def test_clear(store: EntryStore, clock: FakeClock) -> None:
    for key in ("x", "y", "z"):
        await store.put(make_entry(key, clock))
    assert await store.clear() == 3
    stats = await store.stats()
    assert (stats.entries, stats.bytes) == (0, 0)
    assert await store.get("x") is None
    assert await present(store) == {}


async def test_stats_report_budgets_and_usage(make_store: MakeStore, clock: FakeClock) -> None:
    store = await make_store(max_entries=50, max_bytes=1_000_000)
    for key in ("p", "q"):
        await store.put(make_entry(key, clock, payload=key * 100))
    stats = await store.stats()
    assert (stats.max_entries, stats.max_bytes, stats.entries) == (50, 1_000_000, 2)
    entries = await present(store)
    assert stats.bytes == sum(e.size for e in entries.values())
    # the payload counts towards the size
    assert entries["p"].size > 100


async def test_ttl_expiry(store: EntryStore, clock: FakeClock) -> None:
    await store.put(make_entry("short", clock, ttl=10))
    await store.put(make_entry("long", clock, ttl=100))
    clock.advance(9.5)
    assert await store.get("short") is not None
    clock.advance(0.5)  # expiry is inclusive: now >= expires
    assert await store.get("short") is None
    assert set(await present(store)) == {"long"}
    clock.advance(90)
    assert await store.get("long") is None
    assert await present(store) == {}


async def test_already_expired_entry_is_not_stored(store: EntryStore, clock: FakeClock) -> None:
    assert await store.put(make_entry("dead", clock, ttl=-1)) == []
    assert await store.get("dead") is None


async def test_lru_eviction_order_and_get_touches(make_store: MakeStore, clock: FakeClock) -> None:
    store = await make_store(max_entries=3)
    for key in ("a", "b", "c"):
        assert await store.put(make_entry(key, clock)) == []
    assert await store.get("a") is not None
    assert [e.key for e in await store.put(make_entry("d", clock))] == ["b"]
    assert [e.key for e in await store.put(make_entry("e", clock))] == ["c"]
    assert set(await present(store)) == {"a", "d", "e"}


async def _fill_and_check(store: EntryStore, clock: FakeClock, count: int) -> None:
    for i in range(count):
        before = set(await present(store))
        gone = await store.put(make_entry(f"e{i:03}", clock, payload="x" * (1500 + 97 * (i % 7))))
        gone_keys = [e.key for e in gone]
        assert len(gone_keys) == len(set(gone_keys))
        assert set(gone_keys) <= before
        after = await present(store)
        assert set(after) == (before | {f"e{i:03}"}) - set(gone_keys)
        stats = await store.stats()
        assert stats.entries == len(after) <= stats.max_entries
        assert stats.bytes == sum(e.size for e in after.values()) <= stats.max_bytes


async def test_count_budget_holds(make_store: MakeStore, clock: FakeClock) -> None:
    store = await make_store(max_entries=4)
    await _fill_and_check(store, clock, 15)
    assert (await store.stats()).entries == 4


async def test_byte_budget_holds(make_store: MakeStore, clock: FakeClock) -> None:
    probe = await make_store()
    await probe.put(make_entry("probe", clock, payload="x" * 1500))
    per_entry = (await probe.stats()).bytes
    store = await make_store(max_bytes=int(per_entry * 4.5))
    await _fill_and_check(store, clock, 15)
    stats = await store.stats()
    assert 2 <= stats.entries <= 4


async def test_entry_larger_than_the_budget_is_refused(make_store: MakeStore, clock: FakeClock) -> None:
    store = await make_store(max_bytes=8192)
    await store.put(make_entry("small", clock))
    assert await store.put(make_entry("huge", clock, payload="x" * 20_000)) == []
    assert await store.get("huge") is None
    assert set(await present(store)) == {"small"}


async def test_vectors_round_trip_bit_exact(store: EntryStore, clock: FakeClock) -> None:
    special = np.array([-0.0, 1e-45, np.finfo(np.float32).max, np.finfo(np.float32).tiny,
                        0.1, -0.3333333, 1.0000001, np.nextafter(np.float32(1), np.float32(2))],
                       dtype=np.float32)
    entries = [make_entry("v-special", clock, vector=special)]
    entries += [make_entry(f"v{i}", clock, vector=unit_vector(1000 + i)) for i in range(5)]
    for entry in entries:
        await store.put(entry)
    for entry in entries:
        assert_same(await store.get(entry.key), entry)


async def test_text_and_response_round_trip(store: EntryStore, clock: FakeClock) -> None:
    entry = make_entry("u", clock, payload="héllo 世界 🚀 \"quoted\" \\ \n newline",
                       message={"reasoning_content": None, "tool_calls": [], "score": 0.25})
    await store.put(entry)
    assert_same(await store.get("u"), entry)


async def test_scan_returns_live_entries(store: EntryStore, clock: FakeClock) -> None:
    entries = {key: make_entry(key, clock, semantic=key != "s3") for key in ("s1", "s2", "s3")}
    for entry in entries.values():
        await store.put(entry)
    await store.put(make_entry("s-expiring", clock, ttl=5))
    clock.advance(5)
    found = await present(store)
    assert set(found) == set(entries)
    for key, entry in entries.items():
        assert_same(found[key], entry)
