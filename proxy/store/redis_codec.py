"""Encoding of cache entries in Redis hashes (fields ``m`` meta JSON, ``r`` response JSON,
``v`` float32 vector bytes, ``s`` scope, ``x`` expires), and the event-loop lag gauge the Redis
adapter adds to its time budgets. Anything unreadable decodes to None: a miss, never an error."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from proxy.ports import Entry, Vector
from proxy.tasks import stop_task

log = logging.getLogger(__name__)

F32 = np.dtype("<f4")
#: what an entry costs beyond its payload: the hash, its LRU, expiry and book slots
ENTRY_OVERHEAD = 320


def encode(entry: Entry) -> tuple[bytes, bytes, bytes, int]:
    """(meta, response, vector) as stored, and the size the byte budget counts."""
    vector = b"" if entry.vector is None else np.ascontiguousarray(entry.vector, dtype=F32).tobytes()
    response = orjson.dumps(entry.response, default=json_default)
    prompt = entry.text.encode("utf-8") if entry.text is not None else b""
    size = (len(response) + len(vector) + len(prompt) + len(entry.key) + len(entry.scope)
            + len(entry.model) + ENTRY_OVERHEAD)
    meta = orjson.dumps({"k": entry.key, "s": entry.scope, "model": entry.model, "route": entry.route,
                         "text": entry.text, "created": entry.created, "expires": entry.expires,
                         "size": size})
    return meta, response, vector, size


class LoopLag:
    """How late this event loop runs its callbacks lately (a decaying maximum, capped), measured
    by a task that sleeps ``tick_s`` at a time: under CPU pressure a reply can sit unread in the
    socket for that long, which says nothing about Redis."""

    def __init__(self, tick_s: float = 0.02, cap_s: float = 0.5, decay: float = 0.9) -> None:
        self._tick_s, self._cap_s, self._decay = tick_s, cap_s, decay
        self._lag = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def seconds(self) -> float:
        return self._lag

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-loop-lag")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self._tick_s)
            late = loop.time() - started - self._tick_s
            self._lag = min(self._cap_s, max(late, self._lag * self._decay))



def json_default(value: Any) -> Any:
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return dict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode(fields: Sequence[bytes | None] | None) -> Entry | None:
    """An entry from its stored {m, r, v}; None when absent or unreadable (counts as a miss)."""
    if not fields or fields[0] is None or fields[1] is None:
        return None
    meta_raw, response_raw, vector_raw = fields[0], fields[1], fields[2] if len(fields) > 2 else None
    try:
        meta = orjson.loads(meta_raw)
        response = orjson.loads(response_raw)
        if not isinstance(meta, dict) or not isinstance(response, dict):
            return None
        if vector_raw and len(vector_raw) % F32.itemsize:
            return None
        vector = np.frombuffer(vector_raw, dtype=F32).astype(np.float32) if vector_raw else None
        return Entry(key=str(meta["k"]), scope=str(meta["s"]), model=str(meta["model"]),
                     route=str(meta["route"]), text=meta["text"], vector=vector, response=response,
                     created=float(meta["created"]), expires=float(meta["expires"]), size=int(meta["size"]))
    except (orjson.JSONDecodeError, RecursionError, KeyError, TypeError, ValueError):
        log.warning("unreadable cache entry in redis; treated as absent")
        return None


def vector_row(row: Sequence[bytes | None], now: float) -> tuple[str, Vector] | None:
    """(scope, vector) from a stored {s, x, v} that is live and has a vector."""
    scope, expires, vector = row
    if not scope or not vector or expires is None or len(vector) % F32.itemsize:
        return None
    try:
        if now >= float(expires):
            return None
    except ValueError:
        return None
    return text(scope), np.frombuffer(vector, dtype=F32).astype(np.float32)
