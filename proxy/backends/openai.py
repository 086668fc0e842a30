"""An OpenAI-compatible upstream (DeepSeek by default) over one pooled aiohttp session.

Timeouts are split on purpose: connect, first byte (headers; the whole body when not streaming)
and idle gaps inside a stream. A stream has no total timeout: long answers are legitimate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from pydantic import SecretStr

from ..config import BackendConfig
from ..errors import BackendFailure, BackendTimeout
from ..ports import UpstreamRequest, UpstreamResponse

# Request headers worth forwarding; everything else (cookies, client hop-by-hop headers, the
# proxy's own x-semcache-* controls) stays here.
FORWARD_REQUEST = frozenset({"content-type", "accept", "openai-organization", "openai-project",
                             "openai-beta", "user-agent"})
FORWARD_RESPONSE_PREFIXES = ("x-ratelimit-",)
FORWARD_RESPONSE = frozenset({"content-type", "retry-after", "retry-after-ms", "x-request-id",
                              "openai-processing-ms"})
READ_CHUNK = 64 * 1024


def response_headers(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in FORWARD_RESPONSE or low.startswith(FORWARD_RESPONSE_PREFIXES):
            out[low] = value
    return out


class OpenAIBackend:
    def __init__(self, config: BackendConfig, api_key: SecretStr | None) -> None:
        self._config = config
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None
        # health probes get their own small pool: a backend whose pool is full of long streams
        # is busy, not down, and its probe must not queue behind them
        self._probe_session: aiohttp.ClientSession | None = None

    @property
    def name(self) -> str:
        return self._config.name

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._config.max_concurrency, ttl_dns_cache=300)
        # total=None: streams may run as long as tokens keep coming (idle timeout guards them)
        timeout = aiohttp.ClientTimeout(total=None, connect=self._config.connect_timeout_s)
        # No cookie jar: the session serves every tenant, so a cookie the backend set while
        # answering one of them would ride along on everyone's later calls
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                              auto_decompress=True, trust_env=False,
                                              cookie_jar=aiohttp.DummyCookieJar())
        self._probe_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2),
                                                    trust_env=False,
                                                    cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._probe_session is not None:
            await self._probe_session.close()
            self._probe_session = None

    async def health(self, timeout_s: float) -> bool:
        """GET the backend's own health path (``health_path``; /health for vLLM and llama.cpp,
        /v1/models for OpenAI-type APIs). Up means any HTTP answer below 500 within the time:
        a 401 from an API probed without a key still proves it is reachable and serving."""
        path = self._config.health_url_path()
        if self._probe_session is None or path is None:
            return False
        headers = {}
        if self._api_key is not None:
            headers["Authorization"] = "Bearer " + self._api_key.get_secret_value()
        try:
            async with asyncio.timeout(timeout_s), self._probe_session.get(
                    self._config.base_url + path, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                return resp.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    def _headers(self, request: UpstreamRequest) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST}
        if self._api_key is not None:
            headers["Authorization"] = "Bearer " + self._api_key.get_secret_value()
        elif request.client_auth:
            headers["Authorization"] = request.client_auth
        return headers

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        if self._session is None:
            raise BackendFailure(f"backend {self.name} is not started")
        url = self._config.base_url + request.path + (f"?{request.query}" if request.query else "")
        try:
            async with asyncio.timeout(self._config.first_byte_timeout_s):
                resp = await self._session.request(
                    request.method, url, data=request.body or None, headers=self._headers(request),
                    allow_redirects=False)
                if not request.stream or resp.status != 200:
                    try:
                        body = await resp.read()
                    finally:
                        resp.release()
                    return UpstreamResponse(resp.status, response_headers(resp.headers), body=body)
        except TimeoutError:
            raise BackendTimeout(f"backend {self.name} did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise BackendFailure(f"backend {self.name} is unreachable ({type(exc).__name__})") from None
        return UpstreamResponse(resp.status, response_headers(resp.headers),
                                chunks=self._chunks(resp), release=resp.release)

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    async with asyncio.timeout(self._config.idle_timeout_s):
                        data = await resp.content.readany()
                except TimeoutError:
                    raise BackendTimeout(f"backend {self.name} stream went idle") from None
                except aiohttp.ClientError as exc:
                    raise BackendFailure(
                        f"backend {self.name} stream broke ({type(exc).__name__})") from None
                if not data:
                    return
                yield data
        finally:
            resp.release()
