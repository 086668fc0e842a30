"""sentence-transformers adapter for the Embedder port, and the micro-batching all adapters share.

The model runs on one thread that this adapter owns, never on the event loop. Concurrent
``embed`` calls are micro-batched without a timer: while one model call runs, whatever arrives
queues up, and the next call takes all of it (up to ``max_batch`` texts). Under no load a lookup
costs one model call and no waiting; under load the calls get wider instead of queueing deeper.
That machinery is :class:`BatchingEmbedder`; an adapter subclasses it and supplies only how to
load its model and how to encode a list of texts on the model thread (``proxy/embedding_e5.py``).

The ONNX runtime needs an exported graph the packaged model does not ship, so the first start
exports it once into ``cache_dir/<model name>-onnx`` and later starts load that copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proxy.config import EmbeddingConfig
from proxy.ports import Embedding, Vector
from proxy.tasks import stop_task

log = logging.getLogger(__name__)

#: rows per forward pass inside one model call; sentence-transformers sorts a call's texts by
#: length first, so smaller passes waste less compute on padding than one pass over the batch
_FORWARD_ROWS = 32
_ONNX_FILE = Path("onnx") / "model.onnx"
#: the exported folder runs from its ONNX graph; the torch weights would only double its size
_TORCH_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_WARM_UP = ("warm-up", "A longer warm-up sentence, so that the runtime also sees a wider input.")
_DEFAULT_MAX_QUEUE = 4096
#: torch.onnx.export keeps process-wide state, so exports in one process must take turns;
#: across processes the atomic rename in _onnx_export is what keeps the cache whole
_EXPORT_LOCK = threading.Lock()

BatchCallback = Callable[[int, float], None]


class EmbedderError(RuntimeError):
    """Base for the embedder's own failures; callers turn any of them into a cache miss."""


class EmbedderClosed(EmbedderError):
    pass


class EmbedderNotStarted(EmbedderError):
    pass


class EmbedderOverloaded(EmbedderError):
    pass


def resolve_model(spec: str) -> tuple[str, Path]:
    """(name, folder) for a model spec: ``package:<module>`` or a local folder."""
    if spec.startswith("package:"):
        module_name = spec.removeprefix("package:")
        module = importlib.import_module(module_name)
        if module.__file__ is None:
            raise FileNotFoundError(f"package {module_name!r} has no files on disk")
        name, folder = module_name, Path(module.__file__).resolve().parent / "model"
    else:
        folder = Path(spec).expanduser().resolve()
        name = folder.name
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model in {folder} (model: {spec!r})")
    return name, folder


@dataclass(slots=True, eq=False)
class _Job:
    """One ``embed`` call; filled slice by slice when its texts span several model calls."""

    texts: list[str]
    future: asyncio.Future[Embedding]
    vectors: Vector
    tokens: list[int]
    remaining: int


@dataclass(slots=True, frozen=True)
class _Slice:
    job: _Job
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


class BatchingEmbedder:
    """The Embedder port's queueing and micro-batching over one model thread.

    Subclasses implement :meth:`_load_blocking` and :meth:`_encode_blocking`; both run on the
    model thread, never on the event loop."""

    def __init__(self, config: EmbeddingConfig, *, executor: Executor | None = None,
                 on_batch: BatchCallback | None = None, max_queue: int = _DEFAULT_MAX_QUEUE) -> None:
        self._config = config
        # A shared executor is safe: this adapter never has more than one call in flight.
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="embedding")
        self._on_batch = on_batch
        self._max_queue = max_queue
        self._model: Any = None
        self._dim = 0
        self._max_tokens = 0
        self._queue: deque[_Slice] = deque()
        self._queued_texts = 0
        self._in_flight: list[_Slice] = []
        self._wake = asyncio.Event()
        self._starting = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def dim(self) -> int:
        self._require_started()
        return self._dim

    @property
    def max_tokens(self) -> int:
        """The longest text (in tokens, special tokens included) embedded without truncation."""
        self._require_started()
        return self._max_tokens

    @property
    def queued(self) -> int:
        """Texts waiting for a model call (not counting the one running)."""
        return self._queued_texts

    async def start(self) -> None:
        async with self._starting:
            if self._model is None:
                await self._load()

    def _load_blocking(self) -> tuple[Any, int]:
        """On the model thread: the loaded model and its window in tokens."""
        raise NotImplementedError

    def _encode_blocking(self, model: Any, texts: list[str]) -> tuple[Vector, list[int]]:
        """On the model thread: unit vectors and untruncated token counts of ``texts``."""
        raise NotImplementedError

    async def _load(self) -> None:
        if self._closed:
            raise EmbedderClosed("embedder is closed")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        model, window = await loop.run_in_executor(self._executor, self._load_blocking)
        vectors, _ = await loop.run_in_executor(self._executor, self._encode_blocking, model,
                                                list(_WARM_UP))
        if self._closed:
            raise EmbedderClosed("embedder was closed while it started")
        self._dim = int(vectors.shape[1])
        # The config may only narrow the window: texts past the model's own would be truncated
        # silently and match anything that shares their first few hundred tokens.
        self._max_tokens = min(window or self._config.max_tokens, self._config.max_tokens)
        self._model = model
        self._task = asyncio.create_task(self._run(), name="embedding-batches")
        log.info("embedding model %s ready (%s, dim %d, window %d) in %.1f s", self._config.model,
                 self._config.runtime, self._dim, self._max_tokens, time.perf_counter() - started)

    async def embed(self, texts: Sequence[str]) -> Embedding:
        """Vectors and untruncated token counts, in the order of ``texts``.

        Raises EmbedderNotStarted, EmbedderClosed, EmbedderOverloaded (queue full), or what
        the model raised for the batch this call was part of.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        self._require_started()
        if self._task is None or self._task.done():
            raise EmbedderError("the embedding batch task has stopped")
        batch = list(texts)
        if not batch:
            return Embedding(vectors=np.empty((0, self._dim), dtype=np.float32), tokens=())
        if self._queued_texts + len(batch) > self._max_queue:
            raise EmbedderOverloaded(f"embedding queue is full ({self._queued_texts} texts waiting)")
        job = _Job(texts=batch, future=asyncio.get_running_loop().create_future(),
                   vectors=np.empty((len(batch), self._dim), dtype=np.float32),
                   tokens=[0] * len(batch), remaining=len(batch))
        step = self._config.max_batch
        for start in range(0, len(batch), step):
            self._queue.append(_Slice(job, start, min(start + step, len(batch))))
        self._queued_texts += len(batch)
        self._wake.set()
        return await job.future

    async def close(self) -> None:
        self._closed = True
        await stop_task(self._task)
        self._task = None
        for piece in (*self._in_flight, *self._queue):
            if not piece.job.future.done():
                piece.job.future.set_exception(EmbedderClosed("embedder closed before the text was embedded"))
        self._in_flight = []
        self._queue.clear()
        self._queued_texts = 0
        if self._owns_executor:
            # Shutting down with wait=True would block the loop until a running batch ends;
            # queueing a no-op behind it lets us wait for that without blocking.
            with contextlib.suppress(RuntimeError):
                await asyncio.get_running_loop().run_in_executor(self._executor, _noop)
            self._executor.shutdown(wait=True)
        self._model = None

    def _require_started(self) -> None:
        if self._closed:
            raise EmbedderClosed("embedder is closed")
        if self._model is None:
            raise EmbedderNotStarted("embedder is not started")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._take():
                await self._embed_batch(batch)

    def _take(self) -> list[_Slice]:
        """Everything queued that fits in one model call, skipping callers that gave up."""
        batch: list[_Slice] = []
        size = 0
        while self._queue:
            piece = self._queue[0]
            if piece.job.future.done():
                self._queue.popleft()
                self._queued_texts -= piece.size
                continue
            if batch and size + piece.size > self._config.max_batch:
                break
            self._queue.popleft()
            self._queued_texts -= piece.size
            batch.append(piece)
            size += piece.size
        return batch

    async def _embed_batch(self, batch: list[_Slice]) -> None:
        texts = [text for piece in batch for text in piece.job.texts[piece.start:piece.stop]]
        self._in_flight = batch
        started = time.perf_counter()
        try:
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._encode_blocking, self._model, texts)
        except Exception as exc:
            log.warning("embedding a batch of %d texts failed: %r", len(texts), exc)
            for piece in batch:
                if not piece.job.future.done():
                    piece.job.future.set_exception(exc)
            self._in_flight = []
            return
        self._in_flight = []
        self._report(len(texts), time.perf_counter() - started)
        offset = 0
        for piece in batch:
            job, end = piece.job, offset + piece.size
            # A caller cancelled mid-call just leaves its rows unread; the others are unaffected.
            if not job.future.done():
                job.vectors[piece.start:piece.stop] = vectors[offset:end]
                job.tokens[piece.start:piece.stop] = tokens[offset:end]
                job.remaining -= piece.size
                if job.remaining == 0:
                    job.future.set_result(Embedding(vectors=job.vectors, tokens=tuple(job.tokens)))
            offset = end

    def _report(self, size: int, seconds: float) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(size, seconds)
        except Exception:
            # Metrics must never take the batch loop down with them.
            log.exception("on_batch callback failed")


class SentenceEmbedder(BatchingEmbedder):
    """Embedder port over sentence-transformers (ONNX Runtime or torch), CPU only."""

    def _load_blocking(self) -> tuple[Any, int]:
        model = _load_model(self._config)
        return model, int(model.max_seq_length or self._config.max_tokens)

    def _encode_blocking(self, model: Any, texts: list[str]) -> tuple[Vector, list[int]]:
        return _encode(model, texts)


def _noop() -> None:
    return None


def _encode(model: Any, texts: list[str]) -> tuple[Vector, list[int]]:
    """Runs on the embedding thread: token counts (untruncated) and unit vectors."""
    encoded = model.tokenizer(texts, add_special_tokens=True, truncation=False, padding=False,
                              return_attention_mask=False, return_token_type_ids=False, verbose=False)
    tokens = [len(ids) for ids in encoded["input_ids"]]
    vectors = model.encode(texts, batch_size=_FORWARD_ROWS, convert_to_numpy=True,
                           normalize_embeddings=True, show_progress_bar=False)
    return np.ascontiguousarray(vectors, dtype=np.float32), tokens


def _load_model(config: EmbeddingConfig) -> Any:
    """Runs on the embedding thread, so the slow imports and loads stay off the loop too."""
    # The proxy never fetches models: the hub libraries read these when they are imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # The tokenizer's own thread pool would otherwise use every core, whatever `threads` says.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if config.threads > 1 else "false"
    import torch
    from sentence_transformers import SentenceTransformer

    # Also in ONNX mode: tokenised inputs and pooling still go through torch ops.
    torch.set_num_threads(config.threads)
    name, source = resolve_model(config.model)
    if config.runtime == "torch":
        return SentenceTransformer(str(source), device="cpu", backend="torch", local_files_only=True)
    folder = _onnx_export(SentenceTransformer, name, source, Path(config.cache_dir), config.threads)
    return SentenceTransformer(str(folder), device="cpu", backend="onnx", local_files_only=True,
                               model_kwargs=_onnx_kwargs(config.threads))


def _onnx_kwargs(threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    # Spinning workers would steal the cores the event loop and the other requests need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return {"provider": "CPUExecutionProvider", "session_options": options}


def _onnx_export(loader: Any, name: str, source: Path, cache_dir: Path, threads: int) -> Path:
    """The folder holding ``onnx/model.onnx`` for this model, exporting it on first use.

    The export is built in a private staging folder and renamed into place, so processes
    starting together never see a half-written model: the first rename wins, and the others
    find the target taken and use it.
    """
    target = cache_dir / f"{name}-onnx"
    if (target / _ONNX_FILE).is_file():
        return target
    with _EXPORT_LOCK:
        if not (target / _ONNX_FILE).is_file():
            _export_into(loader, name, source, target, threads)
    return target


def _export_into(loader: Any, name: str, source: Path, target: Path, threads: int) -> None:
    cache_dir = target.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        # A subfolder, because mkdtemp's own folder is private (0700) and would stay so.
        work = staging / "model"
        shutil.copytree(source, work)
        log.info("exporting %s to ONNX in %s (once)", source, target)
        model = loader(str(work), device="cpu", backend="onnx", local_files_only=True,
                       model_kwargs=_onnx_kwargs(threads))
        model.save_pretrained(str(work))
        del model
        for weights in _TORCH_WEIGHTS:
            (work / weights).unlink(missing_ok=True)
        try:
            work.rename(target)
        except OSError as exc:
            if not (target / _ONNX_FILE).is_file():
                raise RuntimeError(f"{target} exists but holds no {_ONNX_FILE}; remove it") from exc
            log.info("another process exported %s first; using its copy", name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
