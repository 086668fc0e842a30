"""A local OpenAI-compatible inference server: vLLM, or llama.cpp's ``llama-server``.

On the wire it is an OpenAI-type backend (same timeouts, headers, streaming), so this adapter
reuses ``OpenAIBackend`` and adds what is particular to a local server:

- ``multi_prompt``: its ``/v1/completions`` takes a list of prompts and decodes them together,
  so the Batcher (proxy/batcher.py) merges compatible requests into one call;
- ``health()``: the server's own ``/health`` (vLLM: 200 once the engine runs; llama.cpp: 200
  once the model is loaded, 503 while loading); ``health_path`` in the config overrides it.

Quirks of llama.cpp's server seen through this adapter (docs/batching.md): for a list of
prompts its ``usage`` and ``timings`` describe the first prompt only, and a streamed list starts
with a ``data: null`` event (the proxy never streams a merged list).
"""

from __future__ import annotations

from typing import ClassVar

from .openai import OpenAIBackend

DEFAULT_HEALTH_TIMEOUT_S = 5.0


class VllmBackend(OpenAIBackend):
    multi_prompt: ClassVar[bool] = True

    async def health(self, timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S) -> bool:
        """GET the server's own health endpoint (``/health`` unless configured otherwise)."""
        return await super().health(timeout_s)
