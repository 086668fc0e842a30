"""sentence-transformers adapter for the Embedder port, and the micro-batching all adapters share.

The model runs on threads that this adapter owns (``workers``, one model instance each), never
on the event loop. Concurrent ``embed`` calls are micro-batched without a timer: while the
model calls run, whatever arrives queues up, and the next free worker takes all of it (up to
``max_batch`` texts). Under no load a lookup
costs one model call and no waiting; under load the calls get wider instead of queueing deeper.
That machinery is :class:`BatchingEmbedder`; an adapter subclasses it and supplies only how to
load its model and how to encode a list of texts on the model thread (``proxy/embedding_e5.py``).

The ONNX runtime needs an exported graph the packaged model does not ship, so the first start
exports it once into ``cache_dir/<model name>-onnx`` and later starts load that copy; with
``quantize: int8`` the first start also derives ``onnx/model_int8.onnx`` from it (offline).
:class:`OnnxEncoder` then runs that graph with ONNX Runtime and the ``tokenizers`` tokenizer
directly; sentence-transformers (and torch) are imported for ``runtime: torch`` and for model
folders the direct path does not know, and to export, which runs in a child process so that a
first start does not keep them resident.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from proxy.config import EmbeddingConfig
from proxy.ports import Embedding, Vector
from proxy.tasks import stop_task

log = logging.getLogger(__name__)

#: rows per forward pass inside one model call. A call's texts are sorted by length first, and
#: a pass is padded to its longest text: measured with 32 texts (docs/benchmarks.md, "Embedder"),
#: passes of 4-8 cost 5.0-6.4 CPU ms a text, 16: 6.5, 32: 9.9-10.3, one at a time: 8.3
_FORWARD_ROWS = 8
_ONNX_FILE = Path("onnx") / "model.onnx"
#: the int8 variant (embedding.quantize: int8), quantized from _ONNX_FILE on first use
_INT8_FILE = Path("onnx") / "model_int8.onnx"
#: sentence-transformers' own default when a model folder does not say
_DEFAULT_WINDOW = 256
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
    """The Embedder port's queueing and micro-batching over ``workers`` model threads.

    Each worker owns one model instance on its own thread and takes the next batch from the
    one queue when it is free, so with two workers a batch runs while the next one fills.
    Subclasses implement :meth:`_load_blocking` and :meth:`_encode_blocking`; both run on a
    model thread, never on the event loop."""

    def __init__(self, config: EmbeddingConfig, *, on_batch: BatchCallback | None = None,
                 max_queue: int = _DEFAULT_MAX_QUEUE) -> None:
        self._config = config
        # One thread per model instance: an instance never sees two calls at once, so
        # adapters need no thread-safety of their own.
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"embedding{i}")
                           for i in range(config.workers)]
        self._on_batch = on_batch
        self._max_queue = max_queue
        self._models: list[Any] = []
        self._dim = 0
        self._max_tokens = 0
        self._queue: deque[_Slice] = deque()
        self._queued_texts = 0
        self._in_flight: dict[int, list[_Slice]] = {}
        self._wake = asyncio.Event()
        self._starting = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
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
        """Texts waiting for a model call (not counting the ones running)."""
        return self._queued_texts

    async def start(self) -> None:
        async with self._starting:
            if not self._models:
                await self._load()

    def _load_blocking(self) -> tuple[Any, int]:
        """On a model thread: the loaded model and its window in tokens."""
        raise NotImplementedError

    def _encode_blocking(self, model: Any, texts: list[str]) -> tuple[Vector, list[int]]:
        """On a model thread: unit vectors and untruncated token counts of ``texts``."""
        raise NotImplementedError

    async def _load(self) -> None:
        if self._closed:
            raise EmbedderClosed("embedder is closed")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        models: list[Any] = []
        window = 0
        # One after the other: the first may export or quantize the model into cache_dir,
        # and the others then load that copy.
        for executor in self._executors:
            model, window = await loop.run_in_executor(executor, self._load_blocking)
            vectors, _ = await loop.run_in_executor(executor, self._encode_blocking, model,
                                                    list(_WARM_UP))
            models.append(model)
            if self._closed:
                raise EmbedderClosed("embedder was closed while it started")
        self._dim = int(vectors.shape[1])
        # The config may only narrow the window: texts past the model's own would be truncated
        # silently and match anything that shares their first few hundred tokens.
        self._max_tokens = min(window or self._config.max_tokens, self._config.max_tokens)
        self._models = models
        self._tasks = [asyncio.create_task(self._work(slot), name=f"embedding-batches-{slot}")
                       for slot in range(len(models))]
        log.info("embedding model %s ready (%s, dim %d, window %d, %d worker%s) in %.1f s",
                 self._config.model, self._config.runtime, self._dim, self._max_tokens,
                 len(models), "" if len(models) == 1 else "s", time.perf_counter() - started)

    async def embed(self, texts: Sequence[str]) -> Embedding:
        """Vectors and untruncated token counts, in the order of ``texts``.

        Raises EmbedderNotStarted, EmbedderClosed, EmbedderOverloaded (queue full), or what
        the model raised for the batch this call was part of.
        """
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one string")
        self._require_started()
        if not any(not task.done() for task in self._tasks):
            raise EmbedderError("the embedding batch tasks have stopped")
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
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []
        running = [piece for pieces in self._in_flight.values() for piece in pieces]
        for piece in (*running, *self._queue):
            if not piece.job.future.done():
                piece.job.future.set_exception(EmbedderClosed("embedder closed before the text was embedded"))
        self._in_flight = {}
        self._queue.clear()
        self._queued_texts = 0
        loop = asyncio.get_running_loop()
        for executor in self._executors:
            # Shutting down with wait=True would block the loop until a running batch ends;
            # queueing a no-op behind it lets us wait for that without blocking.
            with contextlib.suppress(RuntimeError):
                await loop.run_in_executor(executor, _noop)
            executor.shutdown(wait=True)
        self._models = []

    def _require_started(self) -> None:
        if self._closed:
            raise EmbedderClosed("embedder is closed")
        if not self._models:
            raise EmbedderNotStarted("embedder is not started")

    async def _work(self, slot: int) -> None:
        while True:
            batch = self._take()
            if not batch:
                # No await between the empty take and clear(): nothing can be queued unseen.
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._embed_batch(slot, batch)

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

    async def _embed_batch(self, slot: int, batch: list[_Slice]) -> None:
        texts = [text for piece in batch for text in piece.job.texts[piece.start:piece.stop]]
        self._in_flight[slot] = batch
        started = time.perf_counter()
        try:
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(
                self._executors[slot], self._encode_blocking, self._models[slot], texts)
        except Exception as exc:
            log.warning("embedding a batch of %d texts failed: %r", len(texts), exc)
            for piece in batch:
                if not piece.job.future.done():
                    piece.job.future.set_exception(exc)
            del self._in_flight[slot]
            return
        # (cancelled by close(): the batch stays in _in_flight, and close() fails its callers)
        del self._in_flight[slot]
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
    """Embedder port over a sentence-transformers model, CPU only.

    ``runtime: onnx`` runs the exported graph directly: the ``tokenizers`` fast tokenizer, ONNX
    Runtime, and mean pooling in numpy (no torch imported: less CPU per text than
    ``SentenceTransformer.encode`` over the same session, and ~390 MiB less RSS; figures in
    docs/benchmarks.md, "Embedder"). ``runtime: torch`` goes through
    sentence-transformers itself. A model folder whose modules the direct path does not know
    (anything but Transformer, mean/CLS Pooling, Normalize) runs through sentence-transformers
    on ONNX instead.
    """

    def _load_blocking(self) -> tuple[Any, int]:
        model = _load_model(self._config)
        if isinstance(model, OnnxEncoder):
            return model, model.window
        return model, int(model.max_seq_length or self._config.max_tokens)

    def _encode_blocking(self, model: Any, texts: list[str]) -> tuple[Vector, list[int]]:
        if isinstance(model, OnnxEncoder):
            return model.encode(texts)
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


class OnnxEncoder:
    """One exported sentence-transformers model on ONNX Runtime, without sentence-transformers.

    Not thread-safe by design: it lives on the adapter's one model thread. Does what
    ``SentenceTransformer.encode`` does for Transformer -> Pooling -> Normalize (the same
    vectors to ~1e-7), minus torch: tokenize without padding, sort the texts by length, run
    passes of up to ``rows`` texts padded to the longest of the pass (never to the window),
    pool in numpy, normalise.
    """

    def __init__(self, session: Any, tokenizer: Any, *, window: int, pooling: str, lowercase: bool,
                 rows: int = _FORWARD_ROWS) -> None:
        self._session = session
        self._tokenizer = tokenizer
        self.window = window
        self._pooling = pooling
        self._lowercase = lowercase
        self._rows = rows
        self._sep = _sep_id(tokenizer)
        inputs = {i.name: i.type for i in session.get_inputs()}
        # The export takes int64 ids; a graph that wants int32 gets int32 (no cast inside ORT).
        self._dtype = np.int32 if inputs.get("input_ids") == "tensor(int32)" else np.int64
        self._token_types = "token_type_ids" in inputs
        #: only the token states are fetched, whatever else the graph offers
        self._output = [session.get_outputs()[0].name]

    @classmethod
    def load(cls, folder: Path, graph: Path, threads: int, rows: int = _FORWARD_ROWS) -> OnnxEncoder:
        import onnxruntime as ort
        from tokenizers import Tokenizer  # type: ignore[import-untyped]

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # The saved tokenizer.json may carry a fixed padding / truncation (this model's: pad
        # every text to 128): lengths are decided here, per pass, instead.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        st_config = _read_json(folder / "sentence_bert_config.json")
        # sentence-transformers' own order: its config, else the tokenizer's limit; never past
        # the position table (some tokenizers declare a limit of 1e30)
        window = int(st_config.get("max_seq_length")
                     or _read_json(folder / "tokenizer_config.json").get("model_max_length")
                     or _DEFAULT_WINDOW)
        positions = _read_json(folder / "config.json").get("max_position_embeddings")
        window = min(window, int(positions)) if positions else window
        session = ort.InferenceSession(str(graph), _session_options(threads),
                                       providers=["CPUExecutionProvider"])
        return cls(session, tokenizer, window=window, pooling=_pooling_mode(folder) or "mean",
                   lowercase=bool(st_config.get("do_lower_case")), rows=rows)

    def encode(self, texts: list[str]) -> tuple[Vector, list[int]]:
        """Unit vectors and untruncated token counts (special tokens included)."""
        if self._lowercase:
            texts = [text.lower() for text in texts]
        ids = [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]
        tokens = [len(row) for row in ids]
        vectors = np.empty((len(texts), 0), dtype=np.float32)
        order = sorted(range(len(texts)), key=tokens.__getitem__)
        for start in range(0, len(order), self._rows):
            rows = order[start:start + self._rows]
            pooled = self._forward([ids[i] for i in rows])
            if vectors.shape[1] == 0:
                vectors = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            vectors[rows] = pooled
        return vectors, tokens

    def _forward(self, batch: list[list[int]]) -> Vector:
        width = min(max(len(row) for row in batch), self.window)
        input_ids = np.zeros((len(batch), width), dtype=self._dtype)
        mask = np.zeros((len(batch), width), dtype=self._dtype)
        for r, row in enumerate(batch):
            if len(row) > width:
                # what the tokenizer's own truncation keeps: [CLS], the first tokens, [SEP]
                row = [*row[:width - 1], self._sep]
            input_ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if self._token_types:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        hidden = self._session.run(self._output, feeds)[0]
        if self._pooling == "cls":
            pooled = hidden[:, 0, :]
        else:
            weights = mask.astype(np.float32)
            # (rows, 1, width) @ (rows, width, dim): the masked sum in one BLAS call
            pooled = np.matmul(weights[:, None, :], hidden)[:, 0, :] / weights.sum(1, keepdims=True)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return np.ascontiguousarray(pooled / np.maximum(norms, 1e-12), dtype=np.float32)


def _sep_id(tokenizer: Any) -> int:
    for name in ("[SEP]", "</s>"):
        token = tokenizer.token_to_id(name)
        if token is not None:
            return int(token)
    raise ValueError("the tokenizer has no [SEP] or </s> token to end a truncated text with")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _pooling_mode(folder: Path) -> str | None:
    """"mean" or "cls" when the direct path can run this model folder, else None.

    It can when the folder's modules are a Transformer, then a mean or CLS Pooling, then at
    most a Normalize; anything else (Dense layers, other poolings) goes through
    sentence-transformers."""
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8")) \
        if (folder / "modules.json").is_file() else None
    if not isinstance(modules, list) or not (folder / "tokenizer.json").is_file():
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    pooling = _read_json(folder / str(modules[1].get("path", "")) / "config.json")
    mode = pooling.get("pooling_mode")           # sentence-transformers >= 5 writes this
    if mode is None:                             # older ones, one flag per mode
        modes = [key for key, on in pooling.items() if key.startswith("pooling_mode_") and on is True]
        mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(
            modes[0] if len(modes) == 1 else "")
    return mode if mode in ("mean", "cls") else None


def _session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # A chain of ops: nothing to run in parallel, so no inter-op pool to wake.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers would steal the cores the event loop and the other requests need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _load_model(config: EmbeddingConfig) -> Any:
    """Runs on the embedding thread, so the slow imports and loads stay off the loop too."""
    # The proxy never fetches models: the hub libraries read these when they are imported.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # The tokenizer's own thread pool would otherwise use every core, whatever `threads` says.
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if config.threads > 1 else "false"
    name, source = resolve_model(config.model)
    if config.runtime == "torch":
        return _sentence_transformer(config, source, "torch")
    folder = _onnx_export(name, source, Path(config.cache_dir), config.threads)
    if _pooling_mode(folder) is None:
        if config.quantize != "none":
            raise ValueError(f"embedding.quantize: {config.quantize} needs a Transformer -> Pooling "
                             f"model; {config.model} has other modules (use quantize: none)")
        return _sentence_transformer(config, folder, "onnx")
    if config.quantize == "int8":
        # One text per pass: dynamic quantization scales the activations of the whole input
        # tensor, so a text batched with others (or with padding) would get another vector
        # than alone (measured: up to 0.04 apart). Alone, it is the same vector every time.
        return OnnxEncoder.load(folder, _int8_graph(folder), config.threads, rows=1)
    return OnnxEncoder.load(folder, folder / _ONNX_FILE, config.threads)


def _sentence_transformer(config: EmbeddingConfig, folder: Path, backend: str) -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    # Tokenised inputs and pooling go through torch ops, in ONNX mode too.
    torch.set_num_threads(config.threads)
    # file_name: the folder may also hold the int8 copy, and the float graph is the one meant
    kwargs = {"model_kwargs": {**_onnx_kwargs(config.threads), "file_name": str(_ONNX_FILE)}
              } if backend == "onnx" else {}
    return SentenceTransformer(str(folder), device="cpu", backend=backend, local_files_only=True,
                               **kwargs)


def _onnx_kwargs(threads: int) -> dict[str, Any]:
    return {"provider": "CPUExecutionProvider", "session_options": _session_options(threads)}


def _int8_graph(folder: Path) -> Path:
    """The int8 graph next to the exported float one, quantized from it on first use.

    Dynamic quantization: MatMul weights int8 per output channel, activations quantized per
    call; the embedding tables and the attention score products stay float (measured in
    docs/benchmarks.md, "Embedder"). Needs only the float graph on disk, no hub. Written to a
    private name and renamed into place, so a concurrent start never reads half a file (two
    processes quantizing together write the same bytes; the last rename wins).
    """
    target = folder / _INT8_FILE
    if target.is_file():
        return target
    with _EXPORT_LOCK:
        if not target.is_file():
            _quantize_into(folder / _ONNX_FILE, target)
    return target


def _quantize_into(source: Path, target: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log.info("quantizing %s to int8 in %s (once)", source, target)
    model = onnx.load(str(source))
    weights = {tensor.name for tensor in model.graph.initializer}
    # Q.K^T and attention x V multiply two activations: quantizing those costs accuracy and
    # saves little; only products with a weight matrix are quantized.
    products = [node.name for node in model.graph.node
                if node.op_type == "MatMul" and not any(name in weights for name in node.input)]
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".onnx", dir=target.parent)
    os.close(fd)
    # onnxruntime.quantization logs through the root logger: a line per activation tensor and a
    # tip with a URL, on every first start of the shipped config. Only its own records are dropped.
    quiet = _OnlyOutside("onnxruntime")
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(model, staging, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=products)
        os.chmod(staging, 0o644)  # mkstemp's 0600 would hide it from a proxy running as another user
        os.replace(staging, target)
    finally:
        logging.getLogger().removeFilter(quiet)
        Path(staging).unlink(missing_ok=True)


class _OnlyOutside(logging.Filter):
    """Drops records logged from inside the named package's files."""

    def __init__(self, package: str) -> None:
        super().__init__()
        self._part = f"{os.sep}{package}{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        return self._part not in record.pathname


def _onnx_export(name: str, source: Path, cache_dir: Path, threads: int) -> Path:
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
            _export_in_child(name, source, target, threads)
    return target


def _export_in_child(name: str, source: Path, target: Path, threads: int) -> None:
    """Export in a fresh interpreter: the export imports torch and sentence-transformers
    (~500 MiB resident, measured in the soak: a first start stayed at ~820 MiB against ~300 MiB
    for a start from the export), and none of it is needed once the graph is on disk."""
    log.info("exporting %s to ONNX in %s (once, in a child process)", source, target)
    # A plain interpreter rather than multiprocessing's spawn, which re-runs the parent's
    # __main__ and so breaks any embedding script without a main guard; the parent's sys.path
    # makes the child import this same package.
    code = "import sys; from proxy.embedding import _export_child; _export_child(*sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-c", code, name, str(source), str(target), str(threads)],
                          env=env, check=False)
    if done.returncode != 0 or not (target / _ONNX_FILE).is_file():
        raise RuntimeError(f"exporting {name} to ONNX failed (child exit code {done.returncode}; "
                           f"its traceback is on stderr above)")


def _export_child(name: str, source: str, target: str, threads: str) -> None:
    """The child's side of :func:`_export_in_child` (arguments as strings, from its argv)."""
    from sentence_transformers import SentenceTransformer

    _export_into(SentenceTransformer, name, Path(source), Path(target), int(threads))


def _export_into(loader: Any, name: str, source: Path, target: Path, threads: int) -> None:
    cache_dir = target.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        # A subfolder, because mkdtemp's own folder is private (0700) and would stay so.
        work = staging / "model"
        shutil.copytree(source, work)
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
