"""Cross-cutting HTTP concerns: load shedding, errors rendered in OpenAI's shape, request metrics,
the optional token in front of /metrics and the status page, and what aiohttp logs about requests
its HTTP parser refuses."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from aiohttp.http import HttpProcessingError
from aiohttp.typedefs import Middleware
from pydantic import SecretStr

from .appkeys import CONFIG, RESULT, SECRETS, STATE, TENANT_SECRET
from .errors import AuthenticationFailed, MethodNotAllowed, NotFound, Overloaded, ProxyError
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


#: routes that show every tenant's counters: behind server.metrics_token_env when it is set
_SCRAPED = frozenset({"/", "/metrics"})


def bearer_matches(sent: str | None, token: SecretStr) -> bool:
    """Whether ``sent`` is ``Bearer <token>``, compared in constant time so the answer's timing
    says nothing about how much of a guess was right. Header values may hold lone surrogates
    (aiohttp decodes bytes that are not UTF-8 that way): encoded with surrogatepass, never a 500."""
    expected = f"Bearer {token.get_secret_value()}".encode("utf-8", "surrogatepass")
    return hmac.compare_digest((sent or "").encode("utf-8", "surrogatepass"), expected)


def _check_scrape_token(request: web.Request) -> None:
    token = request.app[SECRETS].metrics_token
    if token is None:   # the common case, checked first: this runs on every request
        return
    # the matched route, not the raw path: "/%6detrics" or "/metrics?x" reach the same handler
    resource = request.match_info.route.resource
    if resource is None or resource.canonical not in _SCRAPED:
        return
    if not bearer_matches(request.headers.get("Authorization"), token):
        raise AuthenticationFailed("/metrics and the status page need "
                                   "'Authorization: Bearer <metrics token>'.")


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


class ParserErrorLog(logging.Filter):
    """For the ``aiohttp.server`` logger. aiohttp answers a request its parser refuses (bad
    request line, bad header, oversized header) itself, and logs it at ERROR with a traceback
    whose message quotes the offending bytes: a malformed Authorization line would put a key
    in the log, and any client could fill the log with tracebacks. This turns such a record into
    one WARNING line with the error's class and the peer. Other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed HTTP request from %s: %s (status %s)"
            record.args = (peer, type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


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
            _check_scrape_token(request)
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
