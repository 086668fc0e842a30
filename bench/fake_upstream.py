"""A test double of an OpenAI-compatible upstream (DeepSeek's dialect), as a real aiohttp server.

Answers are deterministic functions of the prompt, so a test can tell whose answer it got.
Faults are asked for inside the prompt, so concurrent requests never steal each other's fault:
``FAULT:500``, ``FAULT:429``, ``FAULT:401``, ``FAULT:break`` (stream dies mid-way),
``FAULT:nodone`` (stream ends without [DONE]), ``FAULT:length`` (finish_reason=length),
``FAULT:error_event`` (in-band error inside the stream), ``FAULT:stall`` (stream goes silent),
``FAULT:toolcall`` (answer is a tool call), ``FAULT:garbage`` (200 with a non-JSON body),
``FAULT:502`` / ``FAULT:503`` / ``FAULT:504`` (error status, no Retry-After), ``FAULT:503ra``
(503 with ``Retry-After: 30``), ``FAULT:reset`` (the connection is closed before any header),
``FAULT:slowheaders`` (the headers come after ``stall_s``).
A count makes a fault flaky: ``FAULT:503x2`` fails the first 2 calls with that exact body and
answers the later ones normally (so a retry of the same request succeeds).
``down = True`` makes every call and the health endpoints answer 503 (a backend that is down and
comes back); ``GET /health`` answers 200 otherwise, like vLLM's and llama.cpp's.

Run it alone for benchmarks: ``python -m bench.fake_upstream --port 9100 --latency-ms 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

FAULT = re.compile(r"FAULT:(\w+)")
FLAKY = re.compile(r"(\w+?)x(\d+)")


@dataclass
class FakeUpstream:
    latency_s: float = 0.0          # before the headers
    chunk_delay_s: float = 0.0      # between stream chunks
    words: int = 12                 # answer length in words
    calls: int = 0
    aborted: int = 0                # handlers cut short because the caller went away
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth_seen: list[str | None] = field(default_factory=list)
    keep_requests: bool = True
    down: bool = False              # every call and /health answer 503
    stall_s: float = 3600.0         # how long FAULT:slowheaders and FAULT:stall wait
    fault_hits: dict[str, int] = field(default_factory=dict)   # calls per flaky request body

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self.down:
            return self._error(503, "fake upstream is down")
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        if self.down:
            return self._error(503, "fake upstream is down")
        return web.json_response({"object": "list", "data": [
            {"id": "deepseek-chat", "object": "model", "owned_by": "deepseek"},
            {"id": "deepseek-reasoner", "object": "model", "owned_by": "deepseek"}]})

    def _answer(self, prompt: str) -> str:
        base = f"Answer to: {prompt[:200]}"
        filler = " ".join(f"w{i}" for i in range(self.words))
        return f"{base} | {filler}"

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], str | None]:
        body = await request.json()
        self.calls += 1
        if self.keep_requests:
            self.requests.append(body)
            self.auth_seen.append(request.headers.get("Authorization"))
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = orjson.dumps(body).decode()
        match = FAULT.search(text)
        if self.down:
            return body, "503"
        if match is None:
            return body, None
        fault = match.group(1)
        flaky = FLAKY.fullmatch(fault)
        if flaky is not None:
            hits = self.fault_hits.get(text, 0) + 1
            self.fault_hits[text] = hits
            return body, flaky.group(1) if hits <= int(flaky.group(2)) else None
        return body, fault

    @staticmethod
    def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        body = {"error": {"message": message, "type": "upstream_test_error", "param": None,
                          "code": str(status)}}
        return web.json_response(body, status=status, headers=headers)

    async def _http_fault(self, request: web.Request, fault: str | None) -> web.Response | None:
        if fault == "reset":
            # the connection dies before any header: the caller sees no HTTP answer at all
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=599)   # never sent: the transport is gone
        if fault == "slowheaders":
            await asyncio.sleep(self.stall_s)
            return None
        if fault == "500":
            return self._error(500, "fake upstream exploded")
        if fault in ("502", "503", "504"):
            return self._error(int(fault), f"fake upstream answered {fault}")
        if fault == "503ra":
            return self._error(503, "fake upstream is overloaded", {"Retry-After": "30"})
        if fault == "429":
            return self._error(429, "slow down", {"Retry-After": "7"})
        if fault == "401":
            return self._error(401, "bad key")
        if fault == "garbage":
            return web.Response(status=200, body=b"<html>not json</html>", content_type="text/html")
        return None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._chat(request)
        except (asyncio.CancelledError, ConnectionResetError):
            self.aborted += 1
            raise

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        failed = await self._http_fault(request, fault)
        if failed is not None:
            return failed
        messages = body.get("messages") or [{}]
        last = messages[-1].get("content") or ""
        prompt = last if isinstance(last, str) else orjson.dumps(last).decode()
        content = self._answer(prompt)
        reasoning = "Thinking about: " + prompt[:50] if body.get("model") == "deepseek-reasoner" else None
        finish = "length" if fault == "length" else ("tool_calls" if fault == "toolcall" else "stop")
        usage = _usage(len(prompt.split()) + 5, len(content.split()))
        ident = f"chatcmpl-fake{self.calls}"
        if not body.get("stream"):
            if fault == "stall":
                await asyncio.sleep(self.stall_s)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if fault == "toolcall":
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "lookup", "arguments": '{"q": "x"}'}}]}
            return web.json_response({
                "id": ident, "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage})
        return await self._stream_chat(request, body, ident, content, reasoning, finish, usage, fault)

    async def _stream_chat(self, request: web.Request, body: dict[str, Any], ident: str, content: str,
                           reasoning: str | None, finish: str, usage: dict[str, Any],
                           fault: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.get("model"), "system_fingerprint": "fp_fake"}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                          "finish_reason": finish_reason}]}
            if include_usage:
                chunk["usage"] = None
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)

        await send({"role": "assistant", "content": ""})
        await response.write(b": keep-alive\n\n")
        if reasoning:
            for piece in _pieces(reasoning):
                await send({"reasoning_content": piece, "content": None})
        pieces = _pieces(content)
        for i, piece in enumerate(pieces):
            if fault == "break" and i == len(pieces) // 2:
                # die mid-answer: close the socket without finishing the chunked body
                assert request.transport is not None
                request.transport.close()
                return response
            if fault == "stall" and i == len(pieces) // 2:
                await asyncio.sleep(self.stall_s)
            if fault == "error_event" and i == len(pieces) // 2:
                await response.write(b'data: {"error": {"message": "overloaded mid-stream", '
                                     b'"type": "server_error", "param": null, "code": null}}\n\n')
                return response
            await send({"content": piece})
        await send({}, finish)
        if include_usage:
            await response.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        if fault != "nodone":
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, fault = await self._begin(request)
        failed = await self._http_fault(request, fault)
        if failed is not None:
            return failed
        prompts = body.get("prompt")
        prompts = prompts if isinstance(prompts, list) else [prompts]
        finish = "length" if fault == "length" else "stop"
        texts = [self._answer(str(p)) for p in prompts]
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                   for i, text in enumerate(texts)]
        usage = _usage(5 * len(prompts), sum(len(text.split()) for text in texts))
        ident = f"cmpl-fake{self.calls}"
        base = {"id": ident, "object": "text_completion", "created": int(time.time()),
                "model": body.get("model")}
        if not body.get("stream"):
            return web.json_response({**base, "choices": choices, "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, text in enumerate(texts):
            for piece in _pieces(text):
                chunk = {**base, "choices": [{"index": index, "text": piece, "logprobs": None,
                                              "finish_reason": None}]}
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            chunk = {**base, "choices": [{"index": index, "text": "", "logprobs": None,
                                          "finish_reason": finish}]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": prompt_tokens,
            "completion_tokens_details": {"reasoning_tokens": 0}}


def _pieces(text: str, size: int = 8) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def main() -> None:
    parser = argparse.ArgumentParser(description="fake OpenAI-compatible upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--words", type=int, default=12)
    args = parser.parse_args()
    fake = FakeUpstream(latency_s=args.latency_ms / 1000, words=args.words, keep_requests=False)
    web.run_app(fake.app(), host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
