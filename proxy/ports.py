"""The seams of the proxy: small Protocols and the plain values that cross them.

The orchestration (pipeline, cache) talks to adapters only through these; app.py plugs the
concrete adapters in. Each port has one contract test suite run against every implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .accounting import Account

Vector = npt.NDArray[np.float32]
"""A unit-length float32 embedding (1-D); a batch is 2-D, one row per text."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached answer.

    ``response`` is the complete OpenAI-shaped answer (``chat.completion`` or
    ``text_completion``), accumulated from the stream when the miss was streamed.
    """

    key: str               # exact key (hex); also the entry's id everywhere
    scope: str             # scope hash (hex): similarity never crosses it
    model: str
    route: str             # "chat" | "completions"
    text: str | None       # the semantic text that was embedded, None for exact-only entries
    vector: Vector | None  # its embedding, None for exact-only entries
    response: Mapping[str, Any]
    created: float         # wall-clock seconds
    expires: float         # wall-clock seconds
    size: int = 0          # bytes counted against the store's budget

    def expired(self, now: float) -> bool:
        return now >= self.expires


@dataclass(frozen=True, slots=True)
class Embedding:
    vectors: Vector                 # shape (n, dim), rows unit length
    tokens: tuple[int, ...]         # tokens per text before truncation


class Embedder(Protocol):
    @property
    def dim(self) -> int: ...

    @property
    def max_tokens(self) -> int:
        """The longest text (in tokens) embedded without truncation."""
        ...

    async def embed(self, texts: Sequence[str]) -> Embedding:
        """Embed texts off the event loop; concurrent callers share model calls."""
        ...

    async def start(self) -> None:
        """Load and warm the model (off the loop)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Neighbour:
    key: str
    score: float


class VectorIndex(Protocol):
    """Nearest-neighbour search partitioned by scope; runs off the event loop."""

    async def add(self, scope: str, key: str, vector: Vector) -> None: ...

    async def add_many(self, items: Iterable[tuple[str, str, Vector]]) -> None: ...

    async def remove(self, scope: str, key: str) -> None: ...

    async def search(self, scope: str, vector: Vector, k: int) -> list[Neighbour]:
        """Best first; empty when the scope has no vectors."""
        ...

    async def clear(self) -> None: ...

    def __len__(self) -> int: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class StoreStats:
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int


class EntryStore(Protocol):
    """Keeps entries by exact key, bounded by count, bytes and TTL."""

    async def get(self, key: str) -> Entry | None:
        """The live entry, or None (also for expired ones). Touches LRU order. Bounded in time
        by the store itself (an exact hit is answered without a timer around this call)."""
        ...

    async def put(self, entry: Entry) -> list[Entry]:
        """Store (replacing any with the same key); returns the entries evicted or replaced,
        so the caller can drop their vectors from the index."""
        ...

    async def delete(self, key: str) -> Entry | None: ...

    async def clear(self) -> int: ...

    async def stats(self) -> StoreStats: ...

    def scan(self) -> AsyncIterator[Entry]:
        """Every live entry, to rebuild an index at start-up."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Change:
    """One change to a shared store, as every replica's index must apply it."""

    op: str                        # "put" | "delete" | "clear"
    scope: str = ""
    key: str = ""
    vector: Vector | None = None   # put: the entry's vector; None drops any vector under the key


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    position: str                  # read on from here
    changes: tuple[Change, ...] = ()
    reset: bool = False            # changes after the position asked for were lost: rebuild


class ChangeFeed(Protocol):
    """The inserts and deletes of a store shared by several replicas, in order (store/redis.py)."""

    async def position(self) -> str:
        """Where the feed is now; a rebuild that scans after taking it misses nothing that
        ``read(position)`` does not bring."""
        ...

    async def read(self, after: str, *, block_s: float, count: int) -> ChangeBatch:
        """Changes after ``after``, waiting up to ``block_s`` for the first one."""
        ...

    def vectors(self, batch: int) -> AsyncIterator[list[tuple[str, str, Vector]]]:
        """(scope, key, vector) of every live entry that has a vector, in batches."""
        ...


class Leases(Protocol):
    """Cross-replica single-flight: one replica at a time calls the backend for a key."""

    async def acquire(self, key: str) -> bool:
        """True: call the backend (this replica holds the lease, kept alive until ``release``,
        or leases are unavailable); False: another replica holds it."""
        ...

    async def release(self, key: str) -> None: ...


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    path: str                         # e.g. "/v1/chat/completions" (backend base_url is prepended)
    query: str
    headers: Mapping[str, str]        # already filtered; Authorization set by the backend adapter
    body: bytes
    client_auth: str | None = None    # the client's Authorization, used only in pass-through mode
    stream: bool = False


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: Mapping[str, str]        # the ones worth passing back (content-type, retry-after, ...)
    body: bytes = b""                 # whole body when not streaming
    chunks: AsyncIterator[bytes] | None = None   # raw body bytes when streaming
    release: Any = field(default=None, repr=False)  # awaitable closer for the connection


class Backend(Protocol):
    @property
    def name(self) -> str: ...

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        """Raise errors.BackendFailure / BackendTimeout when no HTTP answer comes back;
        upstream HTTP errors come back as responses with their status."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds (entry timestamps)."""
        ...

    def monotonic(self) -> float:
        """For durations and deadlines."""
        ...


class Metrics(Protocol):
    """The domain events the orchestration reports; the adapter maps them to Prometheus.

    Every label value passed here comes from a small fixed set (routes, results, reasons,
    configured backend names), never from request content.
    """

    def request(self, route: str, status: int, result: str, seconds: float) -> None: ...

    def lookup(self, result: str) -> None: ...

    def bypass(self, reason: str) -> None: ...

    def similarity(self, score: float, hit: bool) -> None: ...

    def first_token(self, result: str, seconds: float) -> None: ...

    def usage(self, account: Account, source: str) -> None:
        """Tokens, USD, joules and CO2 of one answer: spent (source=backend) or saved
        (source=cache|coalesced)."""
        ...

    def cache_error(self, operation: str) -> None: ...

    def cache_size(self, entries: int, size_bytes: int) -> None: ...

    def stored(self, outcome: str) -> None: ...

    def coalesced(self, kind: str) -> None: ...

    def guard_refusal(self, guard: str) -> None: ...

    def feedback(self, kind: str) -> None:
        """A served answer was marked wrong and its entry evicted (``explicit`` | ``retry``)."""
        ...

    def backend(self, backend: str, status: int, seconds: float) -> None: ...

    def backend_error(self, backend: str, kind: str) -> None: ...

    def batch(self, backend: str, size: int, wait_s: float) -> None:
        """A batch for ``backend`` was flushed: ``size`` requests, the oldest waited ``wait_s``."""
        ...

    def queue_depth(self, backend: str, n: int) -> None:
        """Requests now queued for ``backend`` (in a batch window or waiting for a free slot)."""
        ...

    def backend_state(self, backend: str, state: str) -> None:
        """The backend's circuit breaker is now ``closed`` (up), ``open`` or ``half_open``."""
        ...

    def retry(self, backend: str, reason: str) -> None:
        """A failed attempt on ``backend`` is tried again there (reason: unreachable, timeout,
        or the HTTP status)."""
        ...

    def failover(self, backend: str) -> None:
        """A request gave up on ``backend`` (failed, or its breaker is open) for the next one."""
        ...
