"""Thin HTTP handlers: parse and validate, hand over to the pipeline, render its Reply."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

import orjson
from aiohttp import web

from . import openapi, schemas, status_page
from .appkeys import CACHE, CONFIG, METRICS_TEXT, PIPELINE, RESULT, SECRETS, STATE, TENANT_SECRET
from .cachekey import Directives, parse_directives
from .errors import AuthenticationFailed, BodyTooLarge, InvalidRequest, MethodNotAllowed, NotFound, Overloaded
from .pipeline import ApiRequest, Reply
from .ports import UpstreamRequest
from .report import parse_exposition, summarize
from .tenancy import identify

log = logging.getLogger(__name__)
T = TypeVar("T")

VALIDATORS = {"chat": schemas.validate_chat, "completions": schemas.validate_completion}


async def _read_body(request: web.Request) -> bytes:
    """The whole body within server.body_timeout_s and max_body_bytes (decompressed)."""
    config = request.app[CONFIG].server
    # A body that came whole with its headers (the usual small POST) is read without waiting, so
    # it needs no timer: one call_at and one cancel fewer on every request
    budget = None if request.content.is_eof() else config.body_timeout_s
    try:
        async with asyncio.timeout(budget):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"Request body exceeds the limit of {config.max_body_bytes} bytes.") from None
    except TimeoutError:
        raise InvalidRequest("Timed out reading the request body.", code="body_timeout") from None
    except web.RequestPayloadError:
        # a body the HTTP layer cannot decode (bad Content-Encoding, broken chunking)
        raise InvalidRequest("The request body could not be read (check Content-Encoding and "
                             "Transfer-Encoding).", code="bad_body") from None


async def read_json(request: web.Request) -> tuple[bytes, object]:
    config = request.app[CONFIG].server
    declared = request.content_length
    if declared is not None and declared > config.max_body_bytes:
        raise BodyTooLarge(f"Request body of {declared} bytes exceeds the limit of "
                           f"{config.max_body_bytes} bytes.")
    raw = await _read_body(request)
    if not raw:
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return raw, orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson also refuses invalid UTF-8, lone surrogates and nesting past 1024 levels here
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.",
                             code="invalid_json") from None


def _forward_headers(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


async def completions(request: web.Request, route: str) -> web.StreamResponse:
    app = request.app
    started = time.monotonic()
    raw, body = await read_json(request)
    VALIDATORS[route](body)
    assert isinstance(body, dict)
    caller = identify(request.headers.get("Authorization"), app[CONFIG].tenancy, app[TENANT_SECRET])
    directives = parse_directives(request.headers.get("Cache-Control"),
                                  request.headers.get("x-semcache-threshold"))
    reply = await app[PIPELINE].complete(ApiRequest(
        route=route, body=body, raw=raw, headers=_forward_headers(request), tenant=caller.tenant,
        upstream_auth=caller.upstream_auth, directives=directives, started=started))
    return await render(request, reply)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await completions(request, "chat")


async def text_completions(request: web.Request) -> web.StreamResponse:
    return await completions(request, "completions")


async def render(request: web.Request, reply: Reply) -> web.StreamResponse:
    request[RESULT] = reply.result
    if reply.stream is None:
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)
    response = web.StreamResponse(status=reply.status, headers=reply.headers)
    stream = reply.stream
    try:
        await response.prepare(request)
        async for data in stream:
            await response.write(data)
        await response.write_eof()
    except ConnectionResetError:
        # the client left; nothing can be sent any more, and the answer is not stored
        request[RESULT] = "interrupted"
    except asyncio.CancelledError:
        request[RESULT] = "interrupted"
        raise
    finally:
        # closing the generator releases the upstream connection when the client left early
        await stream.aclose()
    return response


def _plain_path(path: str) -> bool:
    """No dot segments, backslashes or characters that would start a query or a fragment once
    the (decoded) path is appended to the backend's base URL: the call stays under /v1/."""
    return not any(segment in (".", "..") for segment in path.split("/")) and not any(
        ch in path for ch in "\\?#")


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other /v1/* call goes to the default backend untouched (no caching)."""
    if request.path in ("/v1/chat/completions", "/v1/completions"):
        raise MethodNotAllowed(f"{request.path} accepts POST only.")
    if not _plain_path(request.path):
        # "/v1/../admin" would reach the backend's other paths (its metrics, admin, ...)
        raise NotFound("Unknown path.")
    app = request.app
    raw = await _read_body(request) if request.body_exists else b""
    caller = identify(request.headers.get("Authorization"), app[CONFIG].tenancy, app[TENANT_SECRET])
    backend = app[PIPELINE].backend_for(None)
    resp = await backend.send(UpstreamRequest(
        method=request.method, path=request.path, query=request.query_string,
        headers=_forward_headers(request), body=raw, client_auth=caller.upstream_auth))
    request[RESULT] = "bypass"
    headers = dict(resp.headers)
    headers["x-semcache"] = "bypass"
    return web.Response(status=resp.status, body=resp.body, headers=headers)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of these routes (proxy/openapi.py)."""
    return web.json_response(openapi.document())


async def debug_runtime(request: web.Request) -> web.Response:
    """Admin: asyncio tasks, requests in flight and readiness, for soak runs and leak hunting."""
    _require_admin(request)
    request[RESULT] = "admin"
    state = request.app[STATE]
    return web.json_response({"tasks": len(asyncio.all_tasks()), "in_flight": state.in_flight,
                              "ready": state.ready, "draining": state.draining})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ready = state.ready and not state.draining
    body = {"status": "ready" if ready else ("draining" if state.draining else "starting"),
            **state.notes}
    return web.json_response(body, status=200 if ready else 503)


async def status(request: web.Request) -> web.Response:
    """``/``: the headline figures as a self-refreshing HTML page (proxy/status_page.py)."""
    app = request.app
    fill = None
    cache = app[CACHE]
    if cache is not None:
        try:
            stats = await cache.stats()
            fill = status_page.CacheFill(stats.entries, stats.bytes, stats.max_entries, stats.max_bytes)
        except Exception:  # the page still shows the counters when the store cannot answer
            log.warning("status page: cache stats unavailable", exc_info=True)
    summary = summarize(parse_exposition(app[METRICS_TEXT]().decode()))
    return web.Response(text=status_page.render(summary, fill), content_type="text/html",
                        headers={"cache-control": "no-store"})


async def metrics(request: web.Request) -> web.Response:
    text = request.app[METRICS_TEXT]()
    return web.Response(body=text, headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})


#: headers a reverse proxy adds: behind one on the same host every client's peer is loopback, so
#: a tokenless admin call that carries any of them came from somewhere else
_PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Real-IP", "Via")


def _require_admin(request: web.Request) -> None:
    token = request.app[SECRETS].admin_token
    if token is not None:
        sent = request.headers.get("Authorization", "")
        # surrogatepass: a header that is not UTF-8 is a wrong token, not a 500
        if not hmac.compare_digest(sent.encode("utf-8", "surrogatepass"),
                                   f"Bearer {token.get_secret_value()}".encode("utf-8", "surrogatepass")):
            raise AuthenticationFailed("Admin calls need 'Authorization: Bearer <admin token>'.")
        return
    peer = request.remote or ""
    try:
        loopback = ipaddress.ip_address(peer).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise AuthenticationFailed("Admin calls are accepted from loopback only unless an admin token "
                                   "is configured.")
    if any(name in request.headers for name in _PROXY_HEADERS):
        raise AuthenticationFailed("Admin calls through a reverse proxy need an admin token "
                                   "(server.admin_token_env).")


async def cache_stats(request: web.Request) -> web.Response:
    _require_admin(request)
    request[RESULT] = "admin"
    cache = request.app[CACHE]
    if cache is None:
        return web.json_response({"enabled": False})
    stats = await _with_store(request, cache.stats())
    return web.json_response({"enabled": True, "entries": stats.entries, "bytes": stats.bytes,
                              "max_entries": stats.max_entries, "max_bytes": stats.max_bytes})


async def cache_flush(request: web.Request) -> web.Response:
    _require_admin(request)
    request[RESULT] = "admin"
    cache = request.app[CACHE]
    if cache is None:
        raise NotFound("The cache is disabled.")
    removed = await _with_store(request, cache.clear())
    return web.json_response({"flushed": removed})


async def _with_store(request: web.Request, call: Awaitable[T]) -> T:
    """An admin call that needs the shared store. The store being away (Redis down, frozen, its
    breaker open) is the same kind of fault the request path turns into a miss; here there is no
    miss to give, so it is 503 + Retry-After (try again once the breaker may have closed), not a
    500 that reads like a bug in the proxy."""
    try:
        return await call
    except Exception as exc:
        log.warning("admin %s: the cache store is unavailable (%s)", request.path, type(exc).__name__)
        raise Overloaded("The cache store is unavailable; try again later.", code="cache_unavailable",
                         retry_after=request.app[CONFIG].store.breaker_open_s) from exc


#: the client's own Authorization for the admin calls that act on a tenant's request (feedback,
#: explain): the tenant is worked out from it exactly as for a normal request. Without an admin
#: token the plain Authorization header may carry it instead (it is not the admin's then).
CLIENT_AUTH_HEADER = "X-Semcache-Client-Authorization"
_EXPLAIN_MAX_K = 64


def _as_api_request(request: web.Request, body: object) -> ApiRequest:
    """A client's request body, as the pipeline would see it from that client (no directives)."""
    if not isinstance(body, dict):
        raise InvalidRequest("Send the client's request body: a JSON object.")
    route = request.query.get("route") or ("chat" if "messages" in body else "completions")
    if route not in VALIDATORS:
        raise InvalidRequest("route must be 'chat' or 'completions'.", code="invalid_route")
    VALIDATORS[route](body)
    app = request.app
    client_auth = request.headers.get(CLIENT_AUTH_HEADER)
    if client_auth is None and app[SECRETS].admin_token is None:
        client_auth = request.headers.get("Authorization")
    caller = identify(client_auth, app[CONFIG].tenancy, app[TENANT_SECRET])
    return ApiRequest(route=route, body=body, raw=b"", headers={}, tenant=caller.tenant,
                      upstream_auth=None, directives=Directives(), started=time.monotonic())


async def cache_feedback(request: web.Request) -> web.Response:
    """Mark a served answer wrong: ``{"key": "<entry key>"}`` or the client's request body
    (evicts the entry that served it). Counted in semcache_cache_feedback_total{kind="explicit"}."""
    _require_admin(request)
    request[RESULT] = "admin"
    if request.app[CACHE] is None:
        raise NotFound("The cache is disabled.")
    _, body = await read_json(request)
    pipeline = request.app[PIPELINE]
    if isinstance(body, dict) and set(body) == {"key"}:
        if not isinstance(body["key"], str):
            raise InvalidRequest("'key' must be a string.")
        evicted = await pipeline.mark_wrong(key=body["key"])
    else:
        evicted = await pipeline.mark_wrong(_as_api_request(request, body))
    if evicted is None:
        raise NotFound("No cached entry serves this request (it may have expired or been evicted).")
    return web.json_response({"evicted": evicted.key, "kind": "explicit", "prompt": evicted.text,
                              "created": evicted.created})


async def cache_explain(request: web.Request) -> web.Response:
    """What the cache would answer the client's request body with, and why; nothing is
    served, stored or sent to a backend. ``?k=`` neighbours (default cache.top_k)."""
    _require_admin(request)
    request[RESULT] = "admin"
    if request.app[CACHE] is None:
        raise NotFound("The cache is disabled.")
    _, body = await read_json(request)
    try:
        k = int(request.query.get("k", "0")) or None
    except ValueError:
        raise InvalidRequest("k must be a whole number.", code="invalid_k") from None
    if k is not None and not 1 <= k <= _EXPLAIN_MAX_K:
        raise InvalidRequest(f"k must be between 1 and {_EXPLAIN_MAX_K}.", code="invalid_k")
    api_request = _as_api_request(request, body)
    found = await request.app[PIPELINE].explain(api_request, k)
    if found is None:
        raise NotFound("The cache is disabled.")
    policy = request.app[STATE].policy
    return web.json_response({
        "route": api_request.route,
        "scope": found.scope,
        "key": found.key,
        "embedder": found.embedder,
        "exact_hit": found.exact_hit,
        "semantic": found.semantic_text,
        "reason": found.reason,
        "threshold": found.threshold,
        "guards": [*policy.guards.enabled, *(["verifier"] if policy.guards.verifier is not None else [])],
        "neighbours": [{"key": n.key, "score": round(n.score, 6), "above_threshold": n.above_threshold,
                        "refused_by": n.refused_by, "guards_fired": list(n.guards_fired),
                        "verifier_score": None if n.verifier_score is None else round(n.verifier_score, 4),
                        "floor": n.floor, "live": n.live, "prompt": n.text} for n in found.neighbours],
        "decision": found.decision,
        "served_by": found.served_by,
    })


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", text_completions)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_get("/admin/debug/runtime", debug_runtime)
    app.router.add_get("/", status)
    app.router.add_get("/admin/cache/stats", cache_stats)
    app.router.add_post("/admin/cache/flush", cache_flush)
    app.router.add_post("/admin/cache/feedback", cache_feedback)
    app.router.add_post("/admin/cache/explain", cache_explain)
    app.router.add_route("*", "/v1/{tail:.*}", passthrough)

