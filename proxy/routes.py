"""Thin HTTP handlers: parse and validate, hand over to the pipeline, render its Reply."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import time

import orjson
from aiohttp import web

from . import schemas
from .appkeys import CACHE, CONFIG, METRICS_TEXT, PIPELINE, RESULT, SECRETS, STATE, TENANT_SECRET
from .cachekey import parse_directives
from .errors import AuthenticationFailed, BodyTooLarge, InvalidRequest, MethodNotAllowed, NotFound
from .pipeline import ApiRequest, Reply
from .ports import UpstreamRequest
from .tenancy import identify

log = logging.getLogger(__name__)

VALIDATORS = {"chat": schemas.validate_chat, "completions": schemas.validate_completion}


async def read_json(request: web.Request) -> tuple[bytes, object]:
    config = request.app[CONFIG].server
    declared = request.content_length
    if declared is not None and declared > config.max_body_bytes:
        raise BodyTooLarge(f"Request body of {declared} bytes exceeds the limit of "
                           f"{config.max_body_bytes} bytes.")
    try:
        async with asyncio.timeout(config.body_timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(f"Request body exceeds the limit of {config.max_body_bytes} bytes.") from None
    except TimeoutError:
        raise InvalidRequest("Timed out reading the request body.", code="body_timeout") from None
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


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Any other /v1/* call goes to the default backend untouched (no caching)."""
    if request.path in ("/v1/chat/completions", "/v1/completions"):
        raise MethodNotAllowed(f"{request.path} accepts POST only.")
    app = request.app
    raw = await request.read() if request.body_exists else b""
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


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ready = state.ready and not state.draining
    body = {"status": "ready" if ready else ("draining" if state.draining else "starting"),
            **state.notes}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    text = request.app[METRICS_TEXT]()
    return web.Response(body=text, headers={"content-type": "text/plain; version=0.0.4; charset=utf-8"})


def _require_admin(request: web.Request) -> None:
    token = request.app[SECRETS].admin_token
    if token is not None:
        sent = request.headers.get("Authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token.get_secret_value()}".encode()):
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


async def cache_stats(request: web.Request) -> web.Response:
    _require_admin(request)
    request[RESULT] = "admin"
    cache = request.app[CACHE]
    if cache is None:
        return web.json_response({"enabled": False})
    stats = await cache.stats()
    return web.json_response({"enabled": True, "entries": stats.entries, "bytes": stats.bytes,
                              "max_entries": stats.max_entries, "max_bytes": stats.max_bytes})


async def cache_flush(request: web.Request) -> web.Response:
    _require_admin(request)
    request[RESULT] = "admin"
    cache = request.app[CACHE]
    if cache is None:
        raise NotFound("The cache is disabled.")
    removed = await cache.clear()
    return web.json_response({"flushed": removed})


def setup_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", text_completions)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/cache/stats", cache_stats)
    app.router.add_post("/admin/cache/flush", cache_flush)
    app.router.add_route("*", "/v1/{tail:.*}", passthrough)

