"""The shared store on a Sentinel deployment and on a Redis Cluster, real servers only (a master, a
replica and a sentinel; three cluster masters; tests/redis_server.py). On each: the change feed and
the index rebuild, leases, a proxy's exact and semantic hits. On the cluster: every key of a
namespace in one hash slot, namespaces spread over the shards. On Sentinel: a failover while a
proxy is under load costs no request, and the store works on the new master afterwards.

The contract suite (tests/contract/test_store.py) runs on both deployments as well.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis
import requests

from proxy.clock import SystemClock
from proxy.config import ConfigError, parse_config, parse_redis_url
from proxy.index import FaissIndex
from proxy.ports import Entry, Vector
from proxy.replication import FollowSettings, IndexFollower
from proxy.store.redis import RedisLeases, RedisSettings, RedisStore
from proxy.store.redis_connect import keyspace
from tests.redis_server import ClusterDeployment, SentinelDeployment

DIM = 16
#: generous budgets: these tests are about topology, not about time budgets (the machine is busy)
PATIENT = RedisSettings(op_timeout_s=2.0, write_timeout_s=2.0, connect_timeout_s=2.0,
                        background_timeout_s=5.0, lease_ttl_s=2.0)
ENV = {"SEMCACHE_TENANT_SECRET": "topology-test-secret"}
#: these tests are about where entries live, not about which paraphrases the quality checks let
#: through: the rule-based guards only (the learned verifier is tested in its own suites)
CACHE = {"threshold": 0.95,
         "guards": ["time_sensitive", "numbers", "negation", "antonyms", "entities", "order"]}
CAPITAL = "What is the capital city of France?"
CAPITAL_CLOSE = "Which city is the capital of France?"      # 0.972 to CAPITAL with MiniLM
SPIDER = "How many legs does a spider have?"
SPIDER_PARA = "How many legs do spiders have?"              # 0.967 to SPIDER


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelDeployment]:
    deployment = SentinelDeployment(tmp_path_factory.mktemp("sentinel")).start()
    yield deployment
    deployment.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDeployment]:
    deployment = ClusterDeployment(tmp_path_factory.mktemp("cluster")).start()
    yield deployment
    deployment.stop()


@pytest.fixture(params=["sentinel", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    deployment: SentinelDeployment | ClusterDeployment = request.getfixturevalue(request.param)
    return deployment.url


def vec(seed: int) -> Vector:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def entry(key: str, seed: int) -> Entry:
    now = time.time()
    return Entry(key=key, scope="s1", model="m", route="chat", text=f"q {key}", vector=vec(seed),
                 response={"choices": [{"message": {"content": key}, "finish_reason": "stop"}]},
                 created=now, expires=now + 3600)


async def eventually(check: Callable[[], Any], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def stores(url: str) -> AsyncIterator[Callable[..., RedisStore]]:
    namespace = f"topo-{uuid.uuid4().hex[:8]}"
    made: list[RedisStore] = []

    def make(max_entries: int = 1000) -> RedisStore:
        store = RedisStore(url=url, namespace=namespace, clock=SystemClock(), max_entries=max_entries,
                           max_bytes=64 << 20, settings=PATIENT, dim=DIM)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def test_the_index_rebuilds_then_follows_puts_deletes_evictions_and_flushes(
        stores: Callable[..., RedisStore]) -> None:
    writer, reader = stores(max_entries=5), stores(max_entries=5)
    await writer.start()
    for i in range(3):
        await writer.put(entry(f"k{i}", i))
    index = FaissIndex(DIM)
    follower = IndexFollower(feed=reader, index=index, settings=FollowSettings(block_s=0.2, backoff_s=0.05))
    await reader.start()
    await follower.start()
    try:
        assert await follower.wait_synced(10)

        async def indexed() -> set[str]:
            return {n.key for n in await index.search("s1", vec(0), 100)}

        assert await indexed() == {"k0", "k1", "k2"}  # the rebuild
        await writer.delete("k1")
        for i in range(3, 8):  # 7 entries put, 1 deleted, 5 kept: the oldest go
            await writer.put(entry(f"k{i}", i))
        kept = {e.key async for e in writer.scan()}
        assert len(kept) == 5 and "k1" not in kept and "k0" not in kept
        await eventually(lambda: _same(indexed, kept))
        assert await writer.clear() == 5
        await eventually(lambda: _same(indexed, set()))
        assert follower.rebuilds == 1  # followed, never lost its place
    finally:
        await follower.close()
        await index.close()


async def _same(current: Callable[[], Any], want: set[str]) -> bool:
    return bool(await current() == want)


async def test_leases_have_one_holder_across_replicas(stores: Callable[..., RedisStore]) -> None:
    a, b = stores(), stores()
    await a.start()
    await b.start()
    lease_a, lease_b = RedisLeases(a), RedisLeases(b)
    assert await lease_a.acquire("q")
    assert not await lease_b.acquire("q")
    await lease_a.release("q")
    assert await lease_b.acquire("q")
    await lease_b.close()


async def test_a_namespace_lives_in_one_slot_and_namespaces_spread(cluster: ClusterDeployment) -> None:
    store = RedisStore(url=cluster.url, namespace="one-slot", clock=SystemClock(), max_entries=2,
                       max_bytes=64 << 20, settings=PATIENT, dim=DIM)
    await store.start()
    try:
        for i in range(4):  # with evictions, expiry bookkeeping and the change stream
            await store.put(entry(f"x{i}", i))
        assert await RedisLeases(store).acquire("x3")
        assert store.keyspace == "{one-slot}"
        home = cluster.node_of("{one-slot}")
        found: list[bytes] = []
        for node in cluster.nodes:
            with node.client() as client:
                keys = list(client.scan_iter(match="{one-slot}:*", count=1000))
            assert node is home or not keys, "a key of the namespace on another shard"
            found += keys
        assert {k.split(b":")[1] for k in found} >= {b"e", b"lru", b"exp", b"book", b"changes", b"lease"}
    finally:
        await store.clear()
        await store.close()
    # the consequence: one namespace is one shard; different namespaces land on different ones
    homes = {cluster.node_of("{" + f"tenant-{i}" + "}").port for i in range(12)}
    assert len(homes) == len(cluster.nodes)


def test_the_key_layout_elsewhere_is_unchanged() -> None:
    standalone = parse_redis_url("redis://127.0.0.1:6379/0")
    sentinel = parse_redis_url("redis+sentinel://127.0.0.1:26379/semcache")
    cluster = parse_redis_url("redis+cluster://127.0.0.1:7000")
    assert keyspace("semcache", standalone) == keyspace("semcache", sentinel) == "semcache"
    assert keyspace("semcache", cluster) == "{semcache}"
    assert keyspace("app{semcache}", cluster) == "app{semcache}"  # a tag of the operator's own
    assert keyspace("app{}x", cluster) == "{app{}x}"  # an empty tag is no tag


def test_store_urls_name_the_topology_and_refusals_never_repeat_a_password() -> None:
    sentinel = parse_config("store: {type: redis, url: 'redis+sentinel://u@s1:26380,[::1]/cache/2'}")
    assert sentinel.store.redis_target.model_dump() == {
        "topology": "sentinel", "url": "", "nodes": (("s1", 26380), ("::1", 26379)), "service": "cache",
        "db": 2, "username": "u"}
    cluster = parse_config("store: {type: redis, url: 'redis+cluster://n1:7000,n2'}").store.redis_target
    assert (cluster.topology, cluster.nodes) == ("cluster", (("n1", 7000), ("n2", 6379)))
    standalone = parse_redis_url("redis://:hunter2-secret@h:6379/0")
    assert standalone.describe() == "redis://:***@h:6379/0" and "hunter2" not in repr(standalone)
    for url in ("redis+sentinel://u:hunter2-secret@s1/cache", "redis+sentinel://hunter2-secret:x@s1",
                "redis+cluster://:hunter2-secret@n1/3", "rediss+cluster://:hunter2-secret@n1",
                "redis+sentinel://s1:hunter2-secret/cache", "http://:hunter2-secret@h",
                "redis+cluster://n1?password=hunter2-secret", "redis+sentinel://s1"):
        with pytest.raises(ConfigError) as refused:
            parse_config(f"store: {{type: redis, url: '{url}'}}")
        assert "hunter2" not in str(refused.value) and "redis_url" in str(refused.value), url


def _ask(url: str, question: str, key: str) -> requests.Response:
    resp = requests.post(url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                         json={"model": "deepseek-chat", "messages": [{"role": "user", "content": question}]})
    assert resp.status_code == 200, resp.text[:300]
    return resp


def _hit(url: str, question: str, key: str, want: str, within: float = 10.0) -> requests.Response:
    """Ask until the answer is a ``want`` hit (the first answer is stored after it went out)."""
    deadline = time.monotonic() + within
    while (resp := _ask(url, question, key)).headers.get("x-semcache") != want:
        assert time.monotonic() < deadline, f"no {want} hit for {question!r}"
        time.sleep(0.05)
    return resp


def test_a_proxy_serves_exact_and_semantic_hits(url: str, make_proxy: Any) -> None:
    proxy = make_proxy(ENV, cache=CACHE,
                       store={"type": "redis", "url": url, "namespace": f"proxy-{uuid.uuid4().hex[:8]}"})
    key = f"sk-{uuid.uuid4().hex[:12]}"
    first = _ask(proxy, CAPITAL, key)
    assert first.headers["x-semcache"] == "miss"
    exact = _hit(proxy, CAPITAL, key, "exact")
    semantic = _hit(proxy, CAPITAL_CLOSE, key, "semantic")
    answer = first.json()["choices"][0]["message"]["content"]
    assert exact.json()["choices"][0]["message"]["content"] == answer
    assert semantic.json()["choices"][0]["message"]["content"] == answer


def test_a_sentinel_failover_under_load_fails_no_request(sentinel: SentinelDeployment,
                                                         make_proxy: Any) -> None:
    namespace = f"failover-{uuid.uuid4().hex[:8]}"
    proxy = make_proxy(ENV, cache=CACHE,
                       store={"type": "redis", "url": sentinel.url, "namespace": namespace,
                              "breaker_open_s": 0.5, "op_timeout_s": 0.5, "write_timeout_s": 1.0})
    key = f"sk-{uuid.uuid4().hex[:12]}"
    _ask(proxy, CAPITAL, key)
    _hit(proxy, CAPITAL, key, "exact")
    old = sentinel.master_port()

    statuses: list[int] = []
    answered: Counter[str] = Counter()
    stop = threading.Event()

    def load() -> None:  # repeats and new questions, one after the other, all through the switch
        n = 0
        while not stop.is_set():
            question = CAPITAL if n % 2 else f"Question {n} {uuid.uuid4().hex[:6]}"
            body: dict[str, Any] = {"model": "deepseek-chat",
                                    "messages": [{"role": "user", "content": question}]}
            resp = requests.post(proxy + "/v1/chat/completions", timeout=30, json=body,
                                 headers={"Authorization": f"Bearer {key}"})
            statuses.append(resp.status_code)
            answered[resp.headers.get("x-semcache", "")] += 1
            n += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(0.3)
        new = sentinel.failover()
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(60)
    assert new != old
    assert statuses and set(statuses) == {200}, statuses
    print(f"\nfailover {old} -> {new}: {len(statuses)} requests, all 200, answered as {dict(answered)}")
    # the store works on the new master: a new answer is stored there and served exactly and by
    # similarity (which needs this replica's index to follow the feed of the new master)
    _ask(proxy, SPIDER, key)
    _hit(proxy, SPIDER, key, "exact")
    _hit(proxy, SPIDER_PARA, key, "semantic")
    with redis.Redis(host="127.0.0.1", port=new, socket_timeout=5) as client:
        assert client.role()[0] == b"master"
        stored = list(client.scan_iter(match=f"{namespace}:e:*", count=1000))
    assert stored, "nothing stored on the new master"
    # stored (and replicated) before the switch: still there on the new master
    assert _ask(proxy, CAPITAL, key).headers["x-semcache"] == "exact"
