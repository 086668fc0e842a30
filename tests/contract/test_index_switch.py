"""A scope moving from the exact flat index to IVF: built off the event loop while the flat index
answers, nothing added or removed during the build lost, deletes working after the swap."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

import proxy.index
import proxy.index_build
from proxy.config import IndexConfig
from proxy.index import FaissIndex
from proxy.ports import Vector

DIM = 32


def unit_rows(rng: np.random.Generator, n: int, dim: int = DIM) -> Vector:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    normalised: Vector = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normalised


class Gate:
    """A build hook that holds the builder thread at one stage until released."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.stages: list[str] = []
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, stage: str) -> None:
        self.stages.append(stage)
        if stage == self.stage:
            self.reached.set()
            if not self.release.wait(30):
                raise TimeoutError("the test never released the build")

    async def wait(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, 30), f"no build reached {self.stage}"


def config(**values: object) -> IndexConfig:
    return IndexConfig.model_validate({"flat_max_entries": 50, **values})


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., FaissIndex]]:
    built: list[FaissIndex] = []

    def _make(**kwargs: object) -> FaissIndex:
        index = FaissIndex(DIM, **kwargs)  # type: ignore[arg-type]
        built.append(index)
        return index

    yield _make
    for index in built:
        await index.close()


async def top_keys(index: FaissIndex, scope: str, vectors: dict[str, Vector]) -> dict[str, str]:
    return {key: (await index.search(scope, vector, 1))[0].key for key, vector in vectors.items()}


@pytest.mark.parametrize("storage", ["float32", "float16", "sq8"])
async def test_a_scope_past_the_limit_moves_to_ivf(
        make: Callable[..., FaissIndex], rng: np.random.Generator, storage: str) -> None:
    index = make(config=config(storage=storage, flat_max_entries=400))
    rows = unit_rows(rng, 2000)
    vectors = {f"k{i}": row for i, row in enumerate(rows)}
    small = {f"t{i}": row for i, row in enumerate(unit_rows(rng, 10))}
    await index.add_many(("s", key, vector) for key, vector in vectors.items())
    await index.add_many(("t", key, vector) for key, vector in small.items())
    await index.settled()
    assert await index.kinds() == {"ivf": 1, "flat": 1}
    assert len(index) == 2010
    found = await top_keys(index, "s", vectors)
    assert sum(found[key] == key for key in vectors) >= 0.99 * len(vectors)
    assert await top_keys(index, "t", small) == {key: key for key in small}
    for neighbour in await index.search("t", rows[0], 20):
        assert neighbour.key in small        # scopes stay apart after the move


async def test_the_flat_index_answers_during_the_build(
        make: Callable[..., FaissIndex], rng: np.random.Generator) -> None:
    gate = Gate("train")
    index = make(config=config(), build_hook=gate)
    vectors = {f"k{i}": row for i, row in enumerate(unit_rows(rng, 60))}
    await index.add_many(("s", key, vector) for key, vector in vectors.items())
    await gate.wait()
    try:
        assert await index.kinds() == {"flat": 1}
        assert await top_keys(index, "s", vectors) == {key: key for key in vectors}
    finally:
        gate.release.set()
    await index.settled()
    assert await index.kinds() == {"ivf": 1}
    assert gate.stages == ["start", "train", "loaded", "swapped"]


@pytest.mark.parametrize("swap_log_max", [proxy.index.SWAP_LOG_MAX, 8],
                         ids=["swap applies log", "builder replays log"])
@pytest.mark.parametrize("stage", ["train", "loaded"])
async def test_changes_during_the_build_are_kept(
        make: Callable[..., FaissIndex], rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch,
        swap_log_max: int, stage: str) -> None:
    monkeypatch.setattr(proxy.index, "SWAP_LOG_MAX", swap_log_max)
    gate = Gate(stage)
    index = make(config=config(storage="float32"), build_hook=gate)
    live = {f"k{i}": row for i, row in enumerate(unit_rows(rng, 80))}
    await index.add_many(("s", key, vector) for key, vector in live.items())
    await gate.wait()
    try:
        # while the builder is held: new keys, removed keys, keys given new vectors, all at once
        added = {f"new{i}": row for i, row in enumerate(unit_rows(rng, 40))}
        removed = [f"k{i}" for i in range(0, 80, 4)]
        moved = {f"k{i}": row for i, row in zip(range(1, 80, 8), unit_rows(rng, 10), strict=True)}
        await asyncio.gather(    # one by one: a bulk add_many this large would wait for the build
            *(index.add("s", key, vector) for key, vector in added.items()),
            *(index.remove("s", key) for key in removed),
            *(index.add("s", key, vector) for key, vector in moved.items()))
        live.update(added)
        live.update(moved)
        for key in removed:
            del live[key]
        assert await index.kinds() == {"flat": 1}
    finally:
        gate.release.set()
    await index.settled()
    assert await index.kinds() == {"ivf": 1}
    assert len(index) == len(live)
    assert await top_keys(index, "s", live) == {key: key for key in live}
    everything = {n.key for n in await index.search("s", unit_rows(rng, 1)[0], 1000)}
    assert everything == set(live)            # nothing removed came back, nothing added is lost


async def test_delete_and_re_add_after_the_swap(make: Callable[..., FaissIndex],
                                                rng: np.random.Generator) -> None:
    index = make(config=config(storage="float16"))
    vectors = {f"k{i}": row for i, row in enumerate(unit_rows(rng, 120))}
    await index.add_many(("s", key, vector) for key, vector in vectors.items())
    await index.settled()
    assert await index.kinds() == {"ivf": 1}
    await index.remove("s", "k3")
    assert "k3" not in {n.key for n in await index.search("s", vectors["k3"], 5)}
    assert len(index) == 119
    fresh = unit_rows(rng, 1)[0]
    await index.add("s", "k5", fresh)
    found = await index.search("s", fresh, 2)
    assert found[0].key == "k5" and found[0].score == pytest.approx(1.0, abs=1e-3)
    assert "k5" not in {n.key for n in await index.search("s", vectors["k5"], 3)}
    for key in list(vectors):
        await index.remove("s", key)
    assert len(index) == 0 and index.scopes == 0 and await index.kinds() == {}


async def test_a_scope_cleared_during_its_build_is_left_alone(
        make: Callable[..., FaissIndex], rng: np.random.Generator) -> None:
    gate = Gate("train")
    index = make(config=config(), build_hook=gate)
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(unit_rows(rng, 60)))
    await gate.wait()
    await index.clear()
    gate.release.set()
    await index.settled()
    assert gate.stages == ["start", "train"]
    assert await index.kinds() == {} and len(index) == 0
    await index.add("s", "again", unit_rows(rng, 1)[0])
    assert await index.kinds() == {"flat": 1}


async def test_close_during_a_build(rng: np.random.Generator) -> None:
    gate = Gate("loaded")
    index = FaissIndex(DIM, config=config(), build_hook=gate)
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(unit_rows(rng, 60)))
    await gate.wait()
    closing = asyncio.create_task(index.close())
    await asyncio.sleep(0.05)
    gate.release.set()
    await asyncio.wait_for(closing, 10)
    assert "swapped" not in gate.stages


async def test_a_failed_build_keeps_the_flat_index_and_retries_later(
        make: Callable[..., FaissIndex], rng: np.random.Generator) -> None:
    stages: list[str] = []

    def fail_once(stage: str) -> None:
        stages.append(stage)
        if stage == "train" and stages.count("train") == 1:
            raise RuntimeError("injected")

    index = make(config=config(), build_hook=fail_once)
    vectors = {f"k{i}": row for i, row in enumerate(unit_rows(rng, 60))}
    await index.add_many(("s", key, vector) for key, vector in vectors.items())
    await index.settled()
    assert await index.kinds() == {"flat": 1}
    assert await top_keys(index, "s", vectors) == {key: key for key in vectors}
    await index.add_many(("s", f"more{i}", row) for i, row in enumerate(unit_rows(rng, 30)))
    await index.settled()
    assert await index.kinds() == {"flat": 1}      # not yet twice the size it failed at
    await index.add_many(("s", f"most{i}", row) for i, row in enumerate(unit_rows(rng, 40)))
    await index.settled()
    assert await index.kinds() == {"ivf": 1}


async def test_ivf_is_retrained_as_the_scope_grows(make: Callable[..., FaissIndex],
                                                   rng: np.random.Generator) -> None:
    stages: list[str] = []
    index = make(config=config(retrain_growth=2.0), build_hook=stages.append)
    rows = unit_rows(rng, 240)
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(rows[:60]))
    await index.settled()
    assert stages.count("swapped") == 1
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(rows[60:100], start=60))
    await index.settled()
    assert stages.count("swapped") == 1            # 100 < 2 x 60
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(rows[100:], start=100))
    await index.settled()
    assert stages.count("swapped") == 2
    found = await top_keys(index, "s", {f"k{i}": row for i, row in enumerate(rows)})
    assert all(found[key] == key for key in found)


async def test_type_flat_never_moves(make: Callable[..., FaissIndex], rng: np.random.Generator) -> None:
    index = make(config=config(type="flat"))
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(unit_rows(rng, 200)))
    await index.settled()
    assert await index.kinds() == {"flat": 1}


def test_the_builder_cannot_be_the_index_thread() -> None:
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as shared, pytest.raises(ValueError):
        FaissIndex(DIM, executor=shared, builder=shared)


async def test_a_bulk_load_waits_for_a_build_it_outruns(
        make: Callable[..., FaissIndex], rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.index, "SWAP_LOG_MAX", 8)
    gate = Gate("train")
    index = make(config=config(), build_hook=gate)
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(unit_rows(rng, 60)))
    await gate.wait()
    try:
        await asyncio.wait_for(   # a small add goes through at once
            index.add_many(("s", f"a{i}", row) for i, row in enumerate(unit_rows(rng, 10))), 5)
        bulk = asyncio.create_task(
            index.add_many(("s", f"b{i}", row) for i, row in enumerate(unit_rows(rng, 100))))
        await asyncio.sleep(0.2)
        assert not bulk.done()     # the scope grew by more than a quarter during the build: it waits
        assert len(index) == 170   # added (and searchable on the flat index) all the same
    finally:
        gate.release.set()
    await asyncio.wait_for(bulk, 10)
    await index.settled()
    assert await index.kinds() == {"ivf": 1}


async def test_no_retraining_once_nlist_is_at_its_largest(
        make: Callable[..., FaissIndex], rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy.index_build, "AUTO_NLIST_MAX", 2)
    stages: list[str] = []
    index = make(config=config(retrain_growth=2.0), build_hook=stages.append)
    rows = unit_rows(rng, 400)
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(rows[:100]))
    await index.settled()
    await index.add_many(("s", f"k{i}", row) for i, row in enumerate(rows[100:], start=100))
    await index.settled()
    assert stages.count("swapped") == 1    # 4x the size, but the same 2 clusters: no new build
