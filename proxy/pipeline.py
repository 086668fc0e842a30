"""The use case: answer one completion request from the cache, or from a backend and remember it.

Works through the ports only; routes.py turns a ``Reply`` into HTTP.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import streaming
from .cache import Hit, SemanticCache
from .cachekey import Directives, Plan, Rules, effective_threshold, plan
from .config import CacheConfig
from .errors import ProxyError
from .ports import Backend, Clock, Metrics, UpstreamRequest, UpstreamResponse, Vector
from .tasks import TaskTracker

log = logging.getLogger(__name__)

SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}
JSON_TYPE = "application/json"
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True, slots=True)
class Policy:
    """The reloadable part of the configuration that decides caching per request."""

    cache: CacheConfig
    rules: Rules


@dataclass(frozen=True, slots=True)
class ApiRequest:
    route: str                      # "chat" | "completions"
    body: Mapping[str, Any]         # validated JSON
    raw: bytes                      # the body as received
    headers: Mapping[str, str]
    tenant: str
    upstream_auth: str | None
    directives: Directives
    started: float                  # monotonic


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a fresh answer goes once the write gate admits it."""

    plan: Plan
    vector: Vector | None     # computed by the lookup, reused for the store
    embed: bool               # False when the lookup found the text too long to embed


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None
    result: str = "miss"            # exact | semantic | miss | bypass | error
    tokens: Mapping[str, Any] = field(default_factory=dict)


class Pipeline:
    def __init__(self, *, cache: SemanticCache | None, route_backend: Callable[[str], Backend],
                 metrics: Metrics, clock: Clock, policy: Callable[[], Policy],
                 tasks: TaskTracker) -> None:
        self._cache = cache
        self._route_backend = route_backend
        self._metrics = metrics
        self._clock = clock
        self._policy = policy
        self._tasks = tasks

    def backend_for(self, model: str | None) -> Backend:
        return self._route_backend(model or "")

    async def complete(self, req: ApiRequest) -> Reply:
        policy = self._policy()
        model = str(req.body["model"])
        if self._cache is None or not policy.cache.enabled:
            self._metrics.bypass("disabled")
            self._metrics.lookup("bypass")
            return await self._forward(req, None, "bypass")
        the_plan = plan(req.body, tenant=req.tenant, route=req.route, directives=req.directives,
                        rules=policy.rules)
        if the_plan.bypass is not None:
            self._metrics.bypass(the_plan.bypass)
        vector: Vector | None = None
        embed = True
        if the_plan.lookup:
            threshold = effective_threshold(policy.cache.threshold_for(model, req.route), req.directives)
            found = await self._cache.lookup(the_plan, threshold)
            if isinstance(found, Hit):
                self._metrics.lookup(found.kind)
                if found.kind == "semantic":
                    self._metrics.similarity(found.score, True)
                return self._replay(req, found)
            self._metrics.lookup("miss")
            if found.reason is not None:
                self._metrics.bypass(found.reason)
            if found.best is not None:
                self._metrics.similarity(found.best, False)
            vector = found.vector
            embed = found.reason != "too_long"
        else:
            self._metrics.lookup("bypass")
        label = "miss" if the_plan.lookup else "bypass"
        target = _Target(the_plan, vector, embed) if the_plan.store else None
        return await self._forward(req, target, label)

    # -- hits -------------------------------------------------------------------------------

    def _replay(self, req: ApiRequest, hit: Hit) -> Reply:
        response = dict(hit.entry.response)
        prefix = "chatcmpl-" if req.route == "chat" else "cmpl-"
        response["id"] = prefix + secrets.token_hex(12)
        response["created"] = int(self._clock.time())
        headers = {"x-semcache": hit.kind}
        if hit.kind == "semantic":
            headers["x-semcache-similarity"] = f"{hit.score:.4f}"
        usage = response.get("usage")
        tokens = usage if isinstance(usage, Mapping) else {}
        self._metrics.tokens(tokens, "cache")
        if not req.body.get("stream"):
            headers["content-type"] = JSON_TYPE
            return Reply(200, headers, body=orjson.dumps(response), result=hit.kind, tokens=tokens)
        include_usage = bool((req.body.get("stream_options") or {}).get("include_usage"))
        headers.update(SSE_HEADERS)
        return Reply(200, headers, stream=self._replay_events(req, response, include_usage),
                     result=hit.kind, tokens=tokens)

    async def _replay_events(self, req: ApiRequest, response: dict[str, Any],
                             include_usage: bool) -> AsyncGenerator[bytes, None]:
        to_chunks = (streaming.completion_to_chunks if req.route == "chat"
                     else streaming.text_completion_to_chunks)
        first = True
        for chunk in to_chunks(response, include_usage=include_usage):
            if first:
                self._metrics.first_token("hit", self._clock.monotonic() - req.started)
                first = False
            yield streaming.encode_event(orjson.dumps(chunk))
        yield streaming.DONE

    # -- misses -----------------------------------------------------------------------------

    async def _forward(self, req: ApiRequest, target: _Target | None, label: str) -> Reply:
        model = str(req.body["model"])
        backend = self._route_backend(model)
        stream = bool(req.body.get("stream"))
        body, hide_usage = _ask_for_usage(req.body, req.raw) if stream else (req.raw, False)
        upstream = UpstreamRequest(method="POST", path=PATHS[req.route], query="",
                                   headers=req.headers, body=body, client_auth=req.upstream_auth,
                                   stream=stream)
        sent = self._clock.monotonic()
        try:
            resp = await backend.send(upstream)
        except ProxyError as exc:
            self._metrics.backend_error(backend.name, exc.label)
            raise
        self._metrics.backend(backend.name, resp.status, self._clock.monotonic() - sent)
        headers = dict(resp.headers)
        headers["x-semcache"] = label
        if resp.chunks is None:
            return self._fresh_json(req, resp, headers, target, label)
        headers.update(SSE_HEADERS)
        return Reply(resp.status, headers, result=label,
                     stream=self._relay(req, resp, target, hide_usage, backend.name))

    def _fresh_json(self, req: ApiRequest, resp: UpstreamResponse, headers: dict[str, str],
                    target: _Target | None, label: str) -> Reply:
        if resp.status != 200:
            return Reply(resp.status, headers, body=resp.body, result="error")
        try:
            answer = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            return Reply(resp.status, headers, body=resp.body, result=label)
        usage = answer.get("usage") if isinstance(answer, dict) else None
        tokens = usage if isinstance(usage, Mapping) else {}
        self._metrics.tokens(tokens, "backend")
        if target is not None and isinstance(answer, dict):
            self._store_later(req, target, answer)
        return Reply(200, headers, body=resp.body, result=label, tokens=tokens)

    async def _relay(self, req: ApiRequest, resp: UpstreamResponse, target: _Target | None,
                     hide_usage: bool, backend: str) -> AsyncGenerator[bytes, None]:
        """Forward events as they arrive; store the answer only if the stream ends cleanly."""
        parser = streaming.SSEParser()
        acc: streaming.ChatAccumulator | streaming.CompletionAccumulator = (
            streaming.ChatAccumulator() if req.route == "chat" else streaming.CompletionAccumulator())
        first = True
        assert resp.chunks is not None
        try:
            try:
                async for data in resp.chunks:
                    for event in parser.feed(data):
                        acc.add_event(event)
                        if hide_usage and _usage_only(event):
                            continue
                        if first:
                            self._metrics.first_token("miss", self._clock.monotonic() - req.started)
                            first = False
                        yield event.raw
                for event in parser.finish():
                    acc.add_event(event)
            except ProxyError as exc:
                self._metrics.backend_error(backend, exc.label)
                yield streaming.encode_error_event(exc.message, type=exc.type, code=exc.code)
                return
            except streaming.SSEError as exc:
                self._metrics.backend_error(backend, "bad_stream")
                yield streaming.encode_error_event(f"upstream stream is malformed: {exc}",
                                                   type="upstream_error", code="bad_stream")
                return
            if acc.error is not None:
                return  # the upstream's own error event was forwarded as it came
            if not acc.saw_done:
                self._metrics.backend_error(backend, "truncated")
                yield streaming.encode_error_event("upstream stream ended before [DONE]",
                                                   type="upstream_error", code="stream_truncated")
                return
        finally:
            if resp.release is not None:
                resp.release()
        answer = acc.result()
        usage = answer.get("usage")
        self._metrics.tokens(usage if isinstance(usage, Mapping) else {}, "backend")
        if target is not None:
            self._store_later(req, target, answer)

    def _store_later(self, req: ApiRequest, target: _Target, answer: dict[str, Any]) -> None:
        cache = self._cache
        if cache is None:
            return

        async def store() -> None:
            outcome = await cache.store(target.plan, model=str(req.body["model"]), route=req.route,
                                        response=answer, vector=target.vector, embed=target.embed)
            self._metrics.stored(outcome)

        self._tasks.spawn(store(), name="cache-store")


def _ask_for_usage(body: Mapping[str, Any], raw: bytes) -> tuple[bytes, bool]:
    """Streamed answers are stored with their usage, so ask the upstream for it even when the
    client did not; the extra usage-only event is then kept from that client."""
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        return raw, False
    patched = dict(body)
    patched["stream_options"] = {**options, "include_usage": True}
    return orjson.dumps(patched), True


def _usage_only(event: streaming.SSEEvent) -> bool:
    if not event.data.startswith("{") or '"usage"' not in event.data:
        return False
    try:
        obj = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and bool(obj.get("usage"))
