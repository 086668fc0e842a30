"""aiohttp's listening side, with OpenAI-shaped answers to requests its HTTP parser refuses.

aiohttp answers a request its parser cannot read (a bad request line, a header name with a
space, a header past ``max_field_size``, broken chunking) itself, before routing and middlewares,
with a plain-text 400 that echoes the offending bytes. A client of this proxy expects every error
as ``{"error": {...}}``, and echoing a malformed Authorization line back is needless. The hook is
``RequestHandler.handle_error``: this module's handler overrides it, and ``ProxyRunner`` makes the
sites build that handler instead of aiohttp's own.

The coupling is deliberate and small: ``AppRunner.server`` (public) is what ``TCPSite`` calls to
make a protocol per connection, and ``RequestHandler``'s constructor and ``handle_error`` keep
their names within aiohttp 3.x (pinned in constraints.txt). tests/security/test_hostile_input.py
sends the parser errors over a raw socket, so an aiohttp that stops calling this hook fails there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError, LineTooLong

#: what aiohttp's parser refused, in words that quote nothing the client sent
_WHAT = {
    BadHttpMethod: "the request method is not valid HTTP",
    LineTooLong: "the request line or a header is longer than this server accepts",
}
_GENERIC = "the request is not valid HTTP/1.1 (request line, headers or body framing)"


def malformed_http_body(exc: BaseException | None, status: int) -> bytes:
    """The OpenAI-shaped error for a request the HTTP parser refused (pure; no client bytes)."""
    what = next((text for kind, text in _WHAT.items() if isinstance(exc, kind)), _GENERIC)
    code = "request_too_large" if status in (413, 431) else "malformed_http"
    return orjson.dumps({"error": {"message": f"Malformed HTTP request: {what}.",
                                   "type": "invalid_request_error", "param": None, "code": code}})


class OpenAIErrorRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, answering parser errors in OpenAI's error shape."""

    __slots__ = ("_on_refused",)

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop,
                 on_refused: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._on_refused = on_refused

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        # aiohttp's own version logs (ParserErrorLog trims the record) and refuses when part of a
        # response has gone out already; keep both, replace only what is sent
        plain = super().handle_error(request, status, exc, message)
        if not (400 <= status < 500 and isinstance(exc, HttpProcessingError)):
            return plain   # a 500 from a handler that raised: not a parser error, left as is
        if self._on_refused is not None:
            self._on_refused(status)
        reply = web.Response(status=status, body=malformed_http_body(exc, status),
                             content_type="application/json")
        reply.force_close()   # the stream position is unknown after a framing error
        return reply


class _HandlerFactory:
    """What a site calls once per accepted connection."""

    def __init__(self, server: web.Server, options: Mapping[str, Any],
                 on_refused: Callable[[int], None] | None) -> None:
        self._server = server
        self._options = dict(options)
        self._on_refused = on_refused

    def __call__(self) -> OpenAIErrorRequestHandler:
        return OpenAIErrorRequestHandler(self._server, loop=asyncio.get_running_loop(),
                                         on_refused=self._on_refused, **self._options)


class ProxyRunner(web.AppRunner):
    """An AppRunner whose sites make ``OpenAIErrorRequestHandler`` protocols.

    ``handler_options`` are the RequestHandler keyword arguments (access_log, max_field_size,
    ...): given once here, they reach both aiohttp's server and this module's handler."""

    def __init__(self, app: web.Application, *, handler_options: Mapping[str, Any],
                 on_refused: Callable[[int], None] | None = None, **runner_options: Any) -> None:
        super().__init__(app, **runner_options, **handler_options)
        self._handler_options = dict(handler_options)
        self._on_refused = on_refused

    @property
    def server(self) -> Any:
        server = super().server
        if server is None:
            return None
        return _HandlerFactory(server, self._handler_options, self._on_refused)
