"""Cross-cutting HTTP concerns: load shedding, errors rendered in OpenAI's shape, request metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from .appkeys import CONFIG, RESULT, STATE, TENANT_SECRET
from .errors import MethodNotAllowed, NotFound, Overloaded, ProxyError
from .ports import Metrics
from .ratelimit import RateLimiter
from .tenancy import identify

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}


def route_label(path: str) -> str:
    if path in _ROUTES:
        return _ROUTES[path]
    if path.startswith("/v1/"):
        return "passthrough"
    if path.startswith("/admin/"):
        return "admin"
    return "other"


def error_response(exc: ProxyError) -> web.Response:
    return web.Response(status=exc.status, body=orjson.dumps(exc.body()),
                        headers={"content-type": "application/json", **exc.headers()})


def _from_http(exc: web.HTTPException) -> ProxyError:
    if exc.status == 404:
        return NotFound("Unknown path.")
    if exc.status == 405:
        return MethodNotAllowed("Method not allowed on this path.")
    error = ProxyError(exc.reason or "HTTP error", code=None)
    error.status = exc.status
    error.type = "invalid_request_error" if 400 <= exc.status < 500 else "api_error"
    return error


def make_middleware(metrics: Metrics, limiter: RateLimiter | None = None) -> Middleware:
    """``limiter``: per-tenant token buckets (config ``limits``); the tenant is worked out here
    from the Authorization header exactly as the handler does (tenancy.identify), so a tenant
    over its rate gets 429 + Retry-After before its body is read."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        state = request.app[STATE]
        route = route_label(request.path)
        counted = route in ("chat", "completions", "passthrough", "models")
        status = 500
        try:
            if counted:
                if state.draining:
                    raise Overloaded("The proxy is shutting down.", retry_after=1)
                if limiter is not None:
                    app = request.app
                    caller = identify(request.headers.get("Authorization"), app[CONFIG].tenancy,
                                      app[TENANT_SECRET])
                    limiter.check(caller.tenant)
                if state.in_flight >= state.config.server.max_in_flight:
                    raise Overloaded("Too many requests in flight.", retry_after=1)
                state.in_flight += 1
                state.idle.clear()
            try:
                response = await handler(request)
            finally:
                if counted:
                    state.in_flight -= 1
                    if state.in_flight == 0:
                        state.idle.set()
            status = response.status
            return response
        except ProxyError as exc:
            status = exc.status
            request[RESULT] = "error"
            return error_response(exc)
        except web.HTTPException as exc:
            error = _from_http(exc)
            status = error.status
            request[RESULT] = "error"
            return error_response(error)
        except Exception:
            log.exception("unhandled error on %s", route)
            status = 500
            request[RESULT] = "error"
            return error_response(ProxyError("The proxy failed to handle this request."))
        finally:
            if route != "other" or request.path == "/":
                metrics.request(route, status, request.get(RESULT, "none"),
                                time.monotonic() - started)

    return middleware
