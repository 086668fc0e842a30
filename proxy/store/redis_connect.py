"""Clients for the three Redis deployments the shared store accepts (``store.redis_url``, parsed
once into a ``RedisTarget`` by proxy/config.py; docs/scaling.md, "Topologies tested"):

* standalone: ``redis://``, ``rediss://``, ``unix://``, read by redis-py as they are;
* Sentinel: the sentinels are asked for the master of a service on every new connection, and a
  connection still open to a demoted master fails (redis-py turns its READONLY into a connection
  error), so the next one goes to the new master;
* Cluster: redis-py's ``RedisCluster`` follows the slot map. Every key of a namespace carries one
  hash tag (``keyspace``), so each Lua script and the change stream stay in one slot: one
  namespace lives on one shard; several namespaces spread over the shards.

Whatever the topology, the caller chooses the pool size and time budgets, and redis-py's own
retries are off: on the request path a slow answer is a miss, not a reason to try again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from proxy.config import RedisTarget

#: what the store talks to: one server (standalone or the Sentinel master) or a cluster
Client = Redis | RedisCluster


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The master's pool with the standalone pool's manners: a caller waits (within its budget)
    for a free connection instead of failing at once when all are busy."""


def keyspace(namespace: str, target: RedisTarget) -> str:
    """The prefix of every key of a namespace. On a Cluster it must hold a hash tag so that all
    of them hash to one slot: ``{<namespace>}`` unless the namespace already has a tag (a
    non-empty ``{...}``). Elsewhere the namespace is the prefix, as it always was."""
    if target.topology != "cluster":
        return namespace
    start = namespace.find("{")
    end = namespace.find("}", start + 1) if start >= 0 else -1
    if start >= 0 and end > start + 1:
        return namespace
    return "{" + namespace + "}"


@dataclass
class Connection:
    """A client, and what has to be closed with it (a Sentinel's own connections)."""

    client: Client
    _also: list[Redis] = field(default_factory=list)

    async def close(self) -> None:
        for client in (self.client, *self._also):
            with contextlib.suppress(Exception):
                await client.aclose()


def connect(target: RedisTarget, *, password: str | None, max_connections: int, socket_timeout: float,
            pool_timeout: float, connect_timeout: float) -> Connection:
    """A client for ``target``; nothing is contacted until the first command."""
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout, "socket_connect_timeout": max(connect_timeout, 0.001),
        "retry": Retry(NoBackoff(), 0), "health_check_interval": 0,
        **({"password": password} if password else {}),
    }
    if target.topology == "standalone":
        pool = BlockingConnectionPool.from_url(target.url, max_connections=max_connections,
                                               timeout=pool_timeout, **common)
        return Connection(Redis(connection_pool=pool))
    if target.username:
        common["username"] = target.username
    if target.topology == "sentinel":
        # the sentinels are asked on every new connection: they get the connect budget too
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs={  # type: ignore[no-untyped-call]
            "socket_timeout": socket_timeout, "socket_connect_timeout": max(connect_timeout, 0.001),
            "retry": Retry(NoBackoff(), 0)})
        client = sentinel.master_for(target.service, connection_pool_class=_BlockingSentinelPool,
                                     max_connections=max_connections, timeout=pool_timeout, db=target.db,
                                     **common)
        return Connection(client, list(sentinel.sentinels))
    common.pop("health_check_interval")
    cluster = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                           max_connections=max_connections, **common)
    return Connection(cluster)
