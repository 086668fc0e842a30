"""The proxy's error tree, rendered at the boundary in OpenAI's error shape.

    ProxyError                      500 api_error            (never raised for bad input)
    ├── InvalidRequest              400 invalid_request_error
    │   ├── BodyTooLarge            413 invalid_request_error
    │   └── UnsupportedMediaType    415 invalid_request_error
    ├── AuthenticationFailed        401 authentication_error
    ├── NotFound                    404 invalid_request_error
    ├── MethodNotAllowed            405 invalid_request_error
    ├── Overloaded                  503 overloaded_error      (carries Retry-After)
    │   ├── RateLimited             429 rate_limit_error      (carries Retry-After)
    │   └── BackendsUnavailable     503 overloaded_error      (every backend's breaker is open)
    └── BackendFailure              502 upstream_error        (no answer at all from the backend)
        └── BackendTimeout          504 upstream_error

Upstream HTTP errors are not part of this tree: they are passed through byte for byte.
Cache faults are not errors either: the cache layer turns them into misses.
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    status = 500
    type = "api_error"
    code: str | None = "internal_error"
    #: bounded label for the errors metric
    label = "internal"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    label = "invalid_request"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "body_too_large"
    label = "body_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"
    label = "unsupported_media_type"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"
    label = "auth"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    label = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    label = "method_not_allowed"


class Overloaded(ProxyError):
    status = 503
    type = "overloaded_error"
    code = "overloaded"
    label = "overloaded"


class RateLimited(Overloaded):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"
    label = "rate_limited"


class BackendsUnavailable(Overloaded):
    """Every backend that serves the model is known to be down (circuit breaker open): the client
    is told at once when to come back instead of waiting for a call that would fail."""

    code = "backend_unavailable"
    label = "circuit_open"


class BackendFailure(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"
    label = "backend_unavailable"


class BackendTimeout(BackendFailure):
    status = 504
    code = "upstream_timeout"
    label = "backend_timeout"
