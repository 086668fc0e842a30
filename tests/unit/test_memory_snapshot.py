"""MemoryStore's snapshot file: round trip, atomic replacement, corrupt files, permissions."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

from proxy.clock import SystemClock
from proxy.ports import Entry
from proxy.store import memory
from proxy.store.memory import MemoryStore

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


def new_store(data_dir: Path | str, clock: FakeClock, **options: Any) -> MemoryStore:
    settings: dict[str, Any] = {"max_entries": 100, "max_bytes": 10_000_000, "dim": DIM,
                                "snapshot_interval_s": 3600.0}
    settings.update(options)
    return MemoryStore(clock=clock, data_dir=data_dir, **settings)


def make_entry(key: str, clock: FakeClock, *, ttl: float = 3600.0, semantic: bool = True) -> Entry:
    vector = np.random.default_rng(sum(map(ord, key))).standard_normal(DIM).astype(np.float32)
    return Entry(key=key, scope="scope", model="m", route="chat",
                 text=f"text {key} ✓" if semantic else None,
                 vector=vector / np.linalg.norm(vector) if semantic else None,
                 response={"object": "chat.completion", "choices": [{"message": {"content": key}}]},
                 created=clock.time(), expires=clock.time() + ttl)


def same(got: Entry | None, want: Entry) -> bool:
    if got is None:
        return False
    fields_equal = (got.key, got.scope, got.model, got.route, got.text, got.response, got.created,
                    got.expires) == (want.key, want.scope, want.model, want.route, want.text,
                                     want.response, want.created, want.expires)
    if want.vector is None or got.vector is None:
        return fields_equal and got.vector is want.vector is None
    return fields_equal and np.array_equal(got.vector.view(np.uint32), want.vector.view(np.uint32))


async def keys(store: MemoryStore) -> list[str]:
    return [entry.key async for entry in store.scan()]


async def saved_store(tmp_path: Path, clock: FakeClock, entries: list[Entry]) -> Path:
    store = new_store(tmp_path, clock)
    await store.start()
    for entry in entries:
        await store.put(entry)
    await store.close()
    assert store.snapshot_path is not None
    return store.snapshot_path


async def test_restart_keeps_entries_vectors_and_lru_order(tmp_path: Path) -> None:
    clock = FakeClock()
    entries = [make_entry("a", clock), make_entry("b", clock), make_entry("c", clock, semantic=False)]
    first = new_store(tmp_path, clock)
    await first.start()
    for entry in entries:
        await first.put(entry)
    await first.get("a")
    await first.close()
    assert first.snapshot_path == tmp_path / "cache.snapshot"
    assert first.snapshot_path.read_bytes().startswith(b"SEMCSNAP")

    second = new_store(tmp_path, clock)
    await second.start()
    assert await keys(second) == ["b", "c", "a"]
    for entry in entries:
        assert same(await second.get(entry.key), entry)
    assert await second.stats() == await first.stats()
    await second.close()


async def test_ttl_is_respected_after_reload(tmp_path: Path) -> None:
    clock = FakeClock()
    await saved_store(tmp_path, clock, [make_entry("short", clock, ttl=100),
                                        make_entry("long", clock, ttl=1000)])
    clock.advance(500)
    store = new_store(tmp_path, clock)
    await store.start()
    assert await keys(store) == ["long"]
    clock.advance(500)
    assert await store.get("long") is None
    await store.close()


async def test_budgets_apply_to_a_loaded_snapshot(tmp_path: Path) -> None:
    clock = FakeClock()
    await saved_store(tmp_path, clock, [make_entry(k, clock) for k in "abcde"])
    store = new_store(tmp_path, clock, max_entries=2)
    await store.start()
    assert await keys(store) == ["d", "e"]
    await store.close()


async def test_entries_put_before_start_stay_newest(tmp_path: Path) -> None:
    clock = FakeClock()
    await saved_store(tmp_path, clock, [make_entry(k, clock) for k in "ab"])
    store = new_store(tmp_path, clock)
    fresh = make_entry("a", clock, semantic=False)
    await store.put(fresh)
    await store.start()
    assert await keys(store) == ["b", "a"]
    assert same(await store.get("a"), fresh)
    assert (await store.stats()).bytes == sum([e.size async for e in store.scan()])
    await store.close()


async def test_vectors_of_another_dimension_are_dropped(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    await saved_store(tmp_path, clock, [make_entry("vec", clock), make_entry("exact", clock, semantic=False)])
    store = new_store(tmp_path, clock, dim=16)
    with caplog.at_level(logging.WARNING, logger="proxy.store.memory"):
        await store.start()
    assert await keys(store) == ["exact"]
    assert "dropped 1 snapshot entries" in caplog.text
    await store.close()


async def test_snapshot_file_is_private(tmp_path: Path) -> None:
    clock = FakeClock()
    previous = os.umask(0)
    try:
        path = await saved_store(tmp_path / "nested", clock, [make_entry("a", clock)])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _boom(*_args: Any, **_kwargs: Any) -> None:
    raise OSError("simulated crash")


def _half_then_boom(file: IO[bytes], entry: Entry) -> None:
    file.write(b"\x01" * 37)
    raise OSError("simulated crash midway through the write")


@pytest.mark.parametrize("target, replacement", [
    (os, ("replace", _boom)),
    (os, ("fsync", _boom)),
    (memory, ("_write_record", _half_then_boom)),
], ids=["rename", "fsync", "mid-write"])
async def test_failed_write_keeps_previous_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    target: Any, replacement: tuple[str, Callable[..., None]]
                                                    ) -> None:
    clock = FakeClock()
    store = new_store(tmp_path, clock)
    await store.start()
    await store.put(make_entry("old", clock))
    assert await store.save_snapshot()
    path = store.snapshot_path
    assert path is not None
    before = path.read_bytes()
    await store.put(make_entry("new", clock))

    with monkeypatch.context() as patch:
        patch.setattr(target, *replacement)
        with pytest.raises(OSError, match="simulated crash"):
            await store.save_snapshot()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cache.snapshot"]
    assert store.dirty

    reader = new_store(tmp_path, clock)
    await reader.start()
    assert await keys(reader) == ["old"]
    await reader.close()
    await store.close()
    assert not store.dirty


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _truncate_after_header(data: bytes) -> bytes:
    return data[:24]


def _garbage(data: bytes) -> bytes:
    return np.random.default_rng(7).bytes(len(data))


def _wrong_version(data: bytes) -> bytes:
    return data[:8] + struct.pack("<I", 99) + data[12:]


def _flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def _trailing_bytes(data: bytes) -> bytes:
    return data + b"\x00"


def _empty(data: bytes) -> bytes:
    return b""


def _huge_length(data: bytes) -> bytes:
    return data[:24] + struct.pack("<III", 0xFFFFFFF0, 0, 0) + data[36:]


@pytest.mark.parametrize("damage", [_truncate, _truncate_after_header, _garbage, _wrong_version,
                                    _flip_a_byte, _trailing_bytes, _empty, _huge_length])
async def test_corrupt_snapshot_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               damage: Callable[[bytes], bytes]) -> None:
    clock = FakeClock()
    path = await saved_store(tmp_path, clock, [make_entry("a", clock), make_entry("b", clock)])
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)

    store = new_store(tmp_path, clock)
    with caplog.at_level(logging.ERROR, logger="proxy.store.memory"):
        await store.start()
    assert len(store) == 0
    assert "unusable" in caplog.text
    assert not path.exists()
    assert (tmp_path / "cache.snapshot.corrupt").read_bytes() == damaged

    await store.put(make_entry("c", clock))
    await store.close()
    reader = new_store(tmp_path, clock)
    await reader.start()
    assert await keys(reader) == ["c"]
    await reader.close()


async def test_periodic_snapshot_while_dirty(tmp_path: Path) -> None:
    clock = FakeClock()
    store = new_store(tmp_path, clock, snapshot_interval_s=0.02)
    await store.start()
    await store.put(make_entry("a", clock))
    assert store.dirty
    path = tmp_path / "cache.snapshot"
    for _ in range(500):
        if not store.dirty and path.exists():
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("no periodic snapshot within 5 s")
    written = path.stat().st_mtime_ns
    await asyncio.sleep(0.1)
    assert path.stat().st_mtime_ns == written  # nothing changed, nothing rewritten
    await store.close()


async def test_snapshots_disabled_without_data_dir(tmp_path: Path) -> None:
    store = MemoryStore(max_entries=10, max_bytes=100_000, clock=SystemClock(), data_dir="")
    await store.start()
    await store.put(make_entry("a", FakeClock(SystemClock().time())))
    assert store.snapshot_path is None
    assert await store.save_snapshot() is False
    await store.close()
    await store.close()


async def test_purge_expired_returns_what_it_dropped(tmp_path: Path) -> None:
    clock = FakeClock()
    store = new_store(tmp_path, clock)
    await store.put(make_entry("short", clock, ttl=10))
    await store.put(make_entry("long", clock, ttl=100))
    clock.advance(10)
    assert [e.key for e in store.purge_expired()] == ["short"]
    assert len(store) == 1
    assert (await store.stats()).bytes == sum([e.size async for e in store.scan()])
