"""In-process entry store: LRU bounded by count and bytes, TTL, and a snapshot file.

Snapshot format (little-endian, version 1)::

    header   8s magic b"SEMCSNAP" | u32 version | u32 dim (0: no vectors) | u64 record count
    record   u32 meta length | u32 vector length in bytes | u32 crc32(meta + vector)
             meta: orjson object (key, scope, model, route, text, response, created, expires, size)
             vector: raw float32 bytes (empty for exact-only entries)

In memory an entry is kept as a ``_Record``: a plain tuple of atomic values whose answer is its
encoded JSON. The garbage collector untracks such tuples, so a million entries add nothing to
a full collection (as parsed dicts they added ~4 tracked objects each: ~0.6 s per full collection
at 100k entries on the dev machine), and they take less memory. ``get`` decodes the answer.

Records are written least recently used first, so a reload restores the LRU order. The file is
read all-or-nothing: a bad magic, unknown version, checksum mismatch, truncation or trailing
bytes means the whole file is moved aside as ``*.corrupt`` and the store starts empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import orjson

from proxy.ports import Clock, Entry, StoreStats, Vector
from proxy.tasks import stop_task

logger = logging.getLogger(__name__)

#: bookkeeping a stored entry costs beyond its payload (dict slot, dataclass, key strings)
ENTRY_OVERHEAD = 512
SNAPSHOT_NAME = "cache.snapshot"
SNAPSHOT_VERSION = 1

_MAGIC = b"SEMCSNAP"
_HEADER = struct.Struct("<8sIIQ")
_RECORD = struct.Struct("<III")
_F32 = np.dtype("<f4")
# scan() hands the loop back this often so a large rebuild cannot starve other requests
_SCAN_YIELD_EVERY = 1024


class SnapshotError(Exception):
    """The snapshot file cannot be trusted."""


def _json_default(value: Any) -> Any:
    # responses are typed as Mapping, which orjson only accepts when it is a dict
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def _encode(value: Any) -> bytes:
    return orjson.dumps(value, default=_json_default)


def entry_size(entry: Entry, payload: bytes | None = None) -> int:
    """What ``entry`` counts against the byte budget (its own ``size`` when already set);
    ``payload``: its response already encoded."""
    if entry.size > 0:
        return entry.size
    text = len(entry.text.encode("utf-8")) if entry.text is not None else 0
    vector = entry.vector.nbytes if entry.vector is not None else 0
    body = len(payload) if payload is not None else len(_encode(entry.response))
    return body + text + vector + ENTRY_OVERHEAD


#: an entry as the store keeps it: a plain tuple of atomic values, which the collector
#: untracks (a tuple subclass such as a NamedTuple stays tracked): (key, scope, model, route,
#: text, vector, payload = the encoded response, created, expires, size)
_Record = tuple[str, str, str, str, str | None, Vector | None, bytes, float, float, int]
_KEY: Final = 0
_VECTOR: Final = 5
_PAYLOAD: Final = 6
_EXPIRES: Final = 8
_SIZE: Final = 9


def _record(entry: Entry, payload: bytes, size: int) -> _Record:
    return (entry.key, entry.scope, entry.model, entry.route, entry.text, entry.vector, payload,
            entry.created, entry.expires, size)


def _entry(record: _Record) -> Entry:
    # positional: the tuple follows Entry's field order, and keywords cost ~2x here (hit path)
    key, scope, model, route, text, vector, payload, created, expires, size = record
    return Entry(key, scope, model, route, text, vector, orjson.loads(payload), created, expires, size)


class MemoryStore:
    """``EntryStore`` kept in this process; optionally persisted to ``<data_dir>/cache.snapshot``.

    Entries are treated as immutable values (the snapshot serialises them off the loop), so
    callers must not mutate a response or vector after handing it over.
    """

    def __init__(self, *, max_entries: int, max_bytes: int, clock: Clock, data_dir: str | Path = "",
                 snapshot_interval_s: float = 60.0, dim: int | None = None) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        if snapshot_interval_s <= 0:
            raise ValueError("snapshot_interval_s must be positive")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._dim = dim
        self._interval = snapshot_interval_s
        self._path = Path(data_dir) / SNAPSHOT_NAME if str(data_dir) else None
        self._entries: OrderedDict[str, _Record] = OrderedDict()
        self._bytes = 0
        # every mutation bumps the generation; the snapshot is current when it matches
        self._generation = 0
        self._written_generation = 0
        self._write_lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def snapshot_path(self) -> Path | None:
        """Where snapshots go, or None when they are disabled."""
        return self._path

    @property
    def dirty(self) -> bool:
        """Whether the store changed since the last snapshot was written."""
        return self._generation != self._written_generation

    def __len__(self) -> int:
        return len(self._entries)

    # -- EntryStore -------------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        record = self._entries.get(key)
        if record is None:
            return None
        if self._clock.time() >= record[_EXPIRES]:
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return _entry(record)

    async def put(self, entry: Entry) -> list[Entry]:
        """Store ``entry``; returns the entry it replaced, then those evicted, oldest first.

        An entry larger than ``max_bytes``, or already expired, is refused: nothing changes and
        the result is ``[]`` (``await get(key)`` tells a refusal from a store).
        Raises ValueError for a vector of the wrong dimension and TypeError for a response
        that is not JSON-encodable.
        """
        if entry.vector is not None and self._dim is not None and entry.vector.size != self._dim:
            raise ValueError(f"vector has dimension {entry.vector.size}, the store expects {self._dim}")
        # orjson's result keeps the 4 KiB buffer it was written into; a copy is its own size
        payload = bytes(memoryview(_encode(entry.response)))
        size = entry_size(entry, payload)
        if size > self._max_bytes or entry.expired(self._clock.time()):
            logger.debug("entry %s refused (size %d, max %d)", entry.key, size, self._max_bytes)
            return []
        gone: list[Entry] = []
        old = self._remove(entry.key)
        if old is not None:
            gone.append(old)
        self._entries[entry.key] = _record(entry, payload, size)
        self._bytes += size
        self._generation += 1
        gone.extend(self._enforce_budgets())
        return gone

    async def delete(self, key: str) -> Entry | None:
        return self._remove(key)

    async def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        self._bytes = 0
        self._generation += 1
        return count

    async def stats(self) -> StoreStats:
        return StoreStats(entries=len(self._entries), bytes=self._bytes,
                          max_entries=self._max_entries, max_bytes=self._max_bytes)

    async def scan(self) -> AsyncIterator[Entry]:
        """Live entries, least recently used first, as they were when the scan began."""
        now = self._clock.time()
        for n, record in enumerate(list(self._entries.values()), 1):
            if now < record[_EXPIRES]:
                yield _entry(record)
            if n % _SCAN_YIELD_EVERY == 0:
                await asyncio.sleep(0)

    def purge_expired(self) -> list[Entry]:
        """Drop every expired entry now; returns them so their vectors can leave the index."""
        now = self._clock.time()
        expired = [record[_KEY] for record in self._entries.values() if now >= record[_EXPIRES]]
        return [entry for key in expired if (entry := self._remove(key)) is not None]

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the snapshot (if any) and start the periodic snapshot task."""
        if self._path is not None:
            self._remove_stale_temp_files()
            await self._load()
            if self._task is None:
                self._task = asyncio.create_task(self._snapshot_loop(), name="memory-store-snapshot")

    def _remove_stale_temp_files(self) -> None:
        # a process killed mid-write leaves its temp file; each crash would leave another
        assert self._path is not None
        for stale in self._path.parent.glob(f".{self._path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    async def close(self) -> None:
        """Stop the periodic task and write a final snapshot if anything changed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await stop_task(self._task)
        self._task = None
        if self._path is not None and self.dirty:
            try:
                await self.save_snapshot()
            except Exception:
                logger.exception("final cache snapshot to %s failed", self._path)

    async def save_snapshot(self) -> bool:
        """Write the snapshot atomically, off the loop. False when snapshots are disabled.

        Raises OSError when the file cannot be written; the previous snapshot stays intact.
        """
        if self._path is None:
            return False
        now = self._clock.time()
        # records are immutable, so a list of them is a consistent copy of the store
        entries = [record for record in self._entries.values() if now < record[_EXPIRES]]
        generation = self._generation
        await asyncio.to_thread(self._write, self._path, entries, generation)
        return True

    # -- internals --------------------------------------------------------------------------------

    def _remove(self, key: str) -> Entry | None:
        record = self._entries.pop(key, None)
        if record is None:
            return None
        self._bytes -= record[_SIZE]
        self._generation += 1
        return _entry(record)

    def _enforce_budgets(self) -> list[Entry]:
        evicted: list[Entry] = []
        while self._entries and (len(self._entries) > self._max_entries or self._bytes > self._max_bytes):
            _, record = self._entries.popitem(last=False)
            self._bytes -= record[_SIZE]
            evicted.append(_entry(record))
        if evicted:
            self._generation += 1
        return evicted

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if not self.dirty:
                continue
            try:
                await self.save_snapshot()
            except Exception:
                logger.exception("cache snapshot to %s failed", self._path)

    def _write(self, path: Path, entries: Sequence[_Record], generation: int) -> None:
        # a save cancelled on the loop keeps running here; the lock keeps writers in order
        with self._write_lock:
            if generation < self._written_generation:
                return
            dim = self._dim or next((v.size for e in entries if (v := e[_VECTOR]) is not None), 0)
            write_snapshot(path, entries, dim)
            self._written_generation = generation

    async def _load(self) -> None:
        assert self._path is not None
        path = self._path
        now = self._clock.time()
        try:
            loaded, dropped = await asyncio.to_thread(read_snapshot, path, self._dim, now)
        except FileNotFoundError:
            return
        except SnapshotError as exc:
            aside = path.with_name(path.name + ".corrupt")
            logger.error("cache snapshot %s is unusable (%s); moved to %s, starting empty",
                         path, exc, aside)
            try:
                os.replace(path, aside)
            except OSError:
                logger.exception("could not move %s aside", path)
            return
        except OSError:
            logger.exception("cannot read cache snapshot %s; starting empty", path)
            return
        if dropped:
            logger.warning("dropped %d snapshot entries whose vector dimension does not match", dropped)
        # anything put before start() is newer than the snapshot, so it stays most recent
        newer = list(self._entries.values())
        self._entries = OrderedDict((e.key, _record(e, bytes(memoryview(_encode(e.response))), e.size))
                                    for e in loaded)
        self._bytes = sum(e.size for e in loaded)
        for record in newer:
            self._remove(record[_KEY])
            self._entries[record[_KEY]] = record
            self._bytes += record[_SIZE]
        self._enforce_budgets()
        logger.info("loaded %d cache entries from %s", len(self._entries), path)


# -- snapshot file ---------------------------------------------------------------------------------


def write_snapshot(path: Path, entries: Sequence[Entry | _Record], dim: int) -> None:
    """Write ``entries`` to ``path`` atomically: temp file, fsync, rename, fsync the folder."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with open(fd, "wb", buffering=1 << 20) as file:
            file.write(_HEADER.pack(_MAGIC, SNAPSHOT_VERSION, dim, len(entries)))
            for entry in entries:
                _write_record(file, entry)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _write_record(file: IO[bytes], item: Entry | _Record) -> None:
    record = item if isinstance(item, tuple) else _record(item, _encode(item.response), item.size)
    key, scope, model, route, text, vec, payload, created, expires, size = record
    response = orjson.Fragment(payload)   # already encoded: spliced in as it is
    meta = _encode({"key": key, "scope": scope, "model": model, "route": route, "text": text,
                    "response": response, "created": created, "expires": expires, "size": size})
    vector = b"" if vec is None else np.ascontiguousarray(vec, dtype=_F32).tobytes()
    file.write(_RECORD.pack(len(meta), len(vector), zlib.crc32(vector, zlib.crc32(meta))))
    file.write(meta)
    file.write(vector)


def _fsync_dir(directory: Path) -> None:
    # makes the rename itself durable; some platforms cannot open a folder, which is fine
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def read_snapshot(path: Path, dim: int | None, now: float) -> tuple[list[Entry], int]:
    """Entries in ``path`` still live at ``now``, and how many were dropped for their dimension.

    ``dim`` is the dimension expected (None: the one in the header). Raises FileNotFoundError,
    OSError, or SnapshotError when the file is not a complete snapshot of this version.
    """
    with open(path, "rb") as file:
        remaining = os.fstat(file.fileno()).st_size

        def take(n: int) -> bytes:
            nonlocal remaining
            # checked against the file size first so a corrupt length cannot ask for gigabytes
            if n > remaining:
                raise SnapshotError("truncated")
            data = file.read(n)
            if len(data) != n:
                raise SnapshotError("truncated")
            remaining -= n
            return data

        magic, version, header_dim, count = _HEADER.unpack(take(_HEADER.size))
        if magic != _MAGIC:
            raise SnapshotError("not a cache snapshot")
        if version != SNAPSHOT_VERSION:
            raise SnapshotError(f"unsupported snapshot version {version}")
        expected = header_dim if dim is None else dim
        entries: list[Entry] = []
        dropped = 0
        for _ in range(count):
            meta_len, vector_len, crc = _RECORD.unpack(take(_RECORD.size))
            meta = take(meta_len)
            vector = take(vector_len)
            if zlib.crc32(vector, zlib.crc32(meta)) != crc:
                raise SnapshotError("checksum mismatch")
            entry = _decode_entry(meta, vector)
            if entry.vector is not None and entry.vector.size != expected:
                dropped += 1
            elif not entry.expired(now):
                entries.append(entry)
        if remaining:
            raise SnapshotError("trailing bytes after the last record")
    return entries, dropped


def _decode_entry(meta: bytes, vector: bytes) -> Entry:
    try:
        fields = orjson.loads(meta)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise SnapshotError(f"bad record: {exc}") from exc
    if not isinstance(fields, dict):
        raise SnapshotError("bad record: not an object")

    def field(name: str, *types: type) -> Any:
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, types):
            raise SnapshotError(f"bad record: field {name!r}")
        return value

    if len(vector) % _F32.itemsize:
        raise SnapshotError("bad record: vector length")
    if field("size", int) <= 0:
        raise SnapshotError("bad record: size")
    return Entry(key=field("key", str), scope=field("scope", str), model=field("model", str),
                 route=field("route", str), text=field("text", str, type(None)),
                 vector=np.frombuffer(vector, dtype=_F32).astype(np.float32) if vector else None,
                 response=field("response", dict), created=float(field("created", int, float)),
                 expires=float(field("expires", int, float)), size=field("size", int))
