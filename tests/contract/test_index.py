"""VectorIndex contract, run against real FAISS (no mocks): the exact flat index, and the IVF
index a scope moves to when it outgrows flat_max_entries (here tiny), in each storage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import numpy as np
import pytest

from proxy.config import IndexConfig
from proxy.index import FaissIndex, IndexClosed
from proxy.ports import Vector, VectorIndex

DIM = 16


class SettledIndex(FaissIndex):
    """Waits for every build after each change, so the searches that follow run on the
    compressed index once a scope has outgrown flat_max_entries."""

    async def add(self, scope: str, key: str, vector: Vector) -> None:
        await super().add(scope, key, vector)
        await self.settled()

    async def add_many(self, items: Iterable[tuple[str, str, Vector]]) -> None:
        await super().add_many(items)
        await self.settled()

    async def remove(self, scope: str, key: str) -> None:
        await super().remove(scope, key)
        await self.settled()


def _ivf(storage: str) -> Callable[[], FaissIndex]:
    config = IndexConfig.model_validate({"flat_max_entries": 3, "storage": storage, "retrain_growth": 2})
    return lambda: SettledIndex(DIM, config=config)


#: implementation -> (factory, tolerance of its scores against exact cosine)
IMPLEMENTATIONS: dict[str, tuple[Callable[[], FaissIndex], float]] = {
    "faiss": (lambda: FaissIndex(DIM), 1e-5),
    "faiss, size from the first vector": (FaissIndex, 1e-5),
    "ivf float32": (_ivf("float32"), 1e-5),
    "ivf float16": (_ivf("float16"), 1e-3),
}
# sq8 is not here: its per-dimension ranges are trained on the scope's vectors, and the four a
# tiny test scope has leave later vectors clipped; test_index_switch.py runs it at a real size.


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def tol(implementation: str) -> float:
    return IMPLEMENTATIONS[implementation][1]


@pytest.fixture
async def index(implementation: str) -> AsyncIterator[FaissIndex]:
    built = IMPLEMENTATIONS[implementation][0]()
    yield built
    await built.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def unit(rng: np.random.Generator, dim: int = DIM) -> Vector:
    vector = rng.standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def near(vector: Vector, rng: np.random.Generator, noise: float) -> Vector:
    moved = vector + noise * unit(rng, vector.shape[0])
    result: Vector = (moved / np.linalg.norm(moved)).astype(np.float32)
    return result


def test_faiss_index_satisfies_the_port() -> None:
    index: VectorIndex = FaissIndex(DIM)
    assert len(index) == 0


async def test_search_finds_the_vector_itself_first(index: FaissIndex, rng: np.random.Generator,
        tol: float) -> None:
    vectors = {f"k{i}": unit(rng) for i in range(20)}
    for key, vector in vectors.items():
        await index.add("s", key, vector)
    assert len(index) == 20
    for key, vector in vectors.items():
        found = await index.search("s", vector, 3)
        assert found[0].key == key
        assert found[0].score == pytest.approx(1.0, abs=tol)
        assert found[0].score <= 1.0


async def test_results_are_best_first_with_cosine_scores(index: FaissIndex, rng: np.random.Generator) -> None:
    query = unit(rng)
    await index.add_many([("s", f"n{noise}", near(query, rng, noise)) for noise in (0.8, 0.05, 0.3, 2.0)])
    found = await index.search("s", query, 4)
    assert [n.key for n in found] == ["n0.05", "n0.3", "n0.8", "n2.0"]
    scores = [n.score for n in found]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)


async def test_k_bounds_the_answer(index: FaissIndex, rng: np.random.Generator) -> None:
    await index.add_many([("s", f"k{i}", unit(rng)) for i in range(10)])
    query = unit(rng)
    assert len(await index.search("s", query, 3)) == 3
    assert len(await index.search("s", query, 1)) == 1
    assert len(await index.search("s", query, 100)) == 10
    assert await index.search("s", query, 0) == []


async def test_an_unknown_scope_is_empty(index: FaissIndex, rng: np.random.Generator) -> None:
    assert await index.search("nowhere", unit(rng), 4) == []
    await index.add("somewhere", "k", unit(rng))
    assert await index.search("nowhere", unit(rng), 4) == []


async def test_similarity_never_crosses_scopes(index: FaissIndex, rng: np.random.Generator) -> None:
    shared = unit(rng)
    await index.add("A", "a-key", shared)
    assert await index.search("B", shared, 5) == []

    await index.add("B", "b-key", unit(rng))
    assert [n.key for n in await index.search("B", shared, 5)] == ["b-key"]

    owner: dict[str, str] = {"a-key": "A", "b-key": "B"}
    items = []
    for i in range(200):
        scope, key = f"scope{i % 7}", f"key{i}"
        owner[key] = scope
        items.append((scope, key, near(shared, rng, 0.1)))
    await index.add_many(items)
    for scope in {*owner.values()}:
        for neighbour in await index.search(scope, shared, 64):
            assert owner[neighbour.key] == scope


async def test_re_adding_a_key_replaces_its_vector(index: FaissIndex, rng: np.random.Generator,
        tol: float) -> None:
    old, new = unit(rng), unit(rng)
    await index.add("s", "k", old)
    await index.add("s", "other", unit(rng))
    await index.add("s", "k", new)
    assert len(index) == 2
    found = await index.search("s", new, 5)
    assert [n.key for n in found].count("k") == 1
    assert found[0].key == "k" and found[0].score == pytest.approx(1.0, abs=tol)
    by_key = {n.key: n.score for n in await index.search("s", old, 5)}
    assert by_key["k"] == pytest.approx(float(old @ new), abs=tol)


async def test_a_key_lives_in_one_scope_only(index: FaissIndex, rng: np.random.Generator) -> None:
    vector = unit(rng)
    await index.add("A", "k", vector)
    await index.add("B", "k", vector)
    assert len(index) == 1
    assert await index.search("A", vector, 2) == []
    assert [n.key for n in await index.search("B", vector, 2)] == ["k"]
    assert index.scopes == 1


async def test_remove(index: FaissIndex, rng: np.random.Generator) -> None:
    keep, drop = unit(rng), unit(rng)
    await index.add("s", "keep", keep)
    await index.add("s", "drop", drop)

    await index.remove("other-scope", "drop")   # wrong scope: nothing happens
    await index.remove("s", "never-added")
    assert len(index) == 2

    await index.remove("s", "drop")
    assert len(index) == 1
    assert [n.key for n in await index.search("s", drop, 5)] == ["keep"]
    await index.remove("s", "drop")             # twice is fine
    assert len(index) == 1


async def test_removing_the_last_vector_drops_the_partition(
        index: FaissIndex, rng: np.random.Generator) -> None:
    await index.add("s", "only", unit(rng))
    await index.add("t", "other", unit(rng))
    assert index.scopes == 2
    await index.remove("s", "only")
    assert index.scopes == 1
    assert await index.search("s", unit(rng), 3) == []
    await index.add("s", "back", unit(rng))
    assert [n.key for n in await index.search("s", unit(rng), 3)] == ["back"]


async def test_add_many_groups_scopes_and_keeps_the_last_duplicate(
        index: FaissIndex, rng: np.random.Generator,
        tol: float) -> None:
    first, last = unit(rng), unit(rng)
    await index.add("s", "existing", unit(rng))
    await index.add_many(iter([("s", "dup", first), ("t", "x", unit(rng)), ("s", "dup", last),
                               ("s", "existing", last)]))
    assert len(index) == 3
    found = {n.key: n.score for n in await index.search("s", last, 5)}
    assert found["dup"] == pytest.approx(1.0, abs=tol)
    assert found["existing"] == pytest.approx(1.0, abs=tol)
    await index.add_many([])
    assert len(index) == 3


async def test_a_wrong_dimension_is_refused_without_partial_adds(
        index: FaissIndex, rng: np.random.Generator) -> None:
    assert await index.search("s", unit(rng), 1) == []
    await index.add("s", "first", unit(rng))
    assert index.dim == DIM
    await index.remove("s", "first")
    with pytest.raises(ValueError):
        await index.add("s", "short", unit(rng, DIM - 1))
    with pytest.raises(ValueError):
        await index.add_many([("s", "good", unit(rng)), ("s", "bad", unit(rng, DIM + 1))])
    assert len(index) == 0
    with pytest.raises(ValueError):
        await index.search("s", unit(rng, DIM * 2), 1)


async def test_clear(index: FaissIndex, rng: np.random.Generator) -> None:
    vector = unit(rng)
    await index.add_many([(f"s{i % 3}", f"k{i}", vector) for i in range(9)])
    await index.clear()
    assert len(index) == 0
    assert index.scopes == 0
    assert await index.search("s0", vector, 5) == []
    await index.add("s0", "k0", vector)
    assert len(index) == 1


async def test_concurrent_adds_and_searches_stay_consistent(
        index: FaissIndex, rng: np.random.Generator) -> None:
    vectors = [unit(rng) for _ in range(100)]

    async def add_then_find(i: int) -> None:
        await index.add(f"s{i % 5}", f"k{i}", vectors[i])
        found = await index.search(f"s{i % 5}", vectors[i], 1)
        assert found[0].key == f"k{i}"

    await asyncio.gather(*(add_then_find(i) for i in range(100)))
    assert len(index) == 100
    await asyncio.gather(*(index.remove(f"s{i % 5}", f"k{i}") for i in range(0, 100, 2)))
    assert len(index) == 50


async def test_on_search_reports_durations(rng: np.random.Generator) -> None:
    seconds: list[float] = []
    index = FaissIndex(DIM, on_search=seconds.append)
    try:
        await index.add("s", "k", unit(rng))
        await index.search("s", unit(rng), 1)
        await index.search("missing", unit(rng), 1)
        assert len(seconds) == 2 and all(s >= 0 for s in seconds)
    finally:
        await index.close()


async def test_real_embedding_size_and_many_vectors(rng: np.random.Generator) -> None:
    index = FaissIndex(384)
    try:
        matrix = rng.standard_normal((2000, 384)).astype(np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        await index.add_many((f"s{i % 4}", f"k{i}", row) for i, row in enumerate(matrix))
        assert len(index) == 2000
        found = await index.search("s1", matrix[5], 4)
        assert found[0].key == "k5" and len(found) == 4
    finally:
        await index.close()


async def test_closed_index_refuses_work(rng: np.random.Generator) -> None:
    index = FaissIndex(DIM)
    await index.add("s", "k", unit(rng))
    await index.close()
    assert len(index) == 0
    with pytest.raises(IndexClosed):
        await index.search("s", unit(rng), 1)
    with pytest.raises(IndexClosed):
        await index.add("s", "k", unit(rng))
    await index.close()
