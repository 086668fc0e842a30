"""When to try a backend call again, and how long to wait: pure, with an injected random source.

Backoff is "full jitter" (AWS architecture blog, "Exponential Backoff And Jitter"): the n-th retry
waits a uniform random time in ``[0, min(max_s, base_s * 2**(n-1))]``. Spreading the waits over the
whole interval keeps many clients that failed together from coming back together.

Only failures that happened before anything reached the client are retried: the caller (the
router) asks only about ``send`` raising (no HTTP answer) or answering with a status in
``statuses`` (default 502, 503, 504). 429 is not in the default set: it goes back to the client with
its Retry-After. Other 4xx and 5xx answers go back untouched.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Random = Callable[[], float]
"""A source of uniform floats in [0, 1), e.g. ``random.random``; tests pass a fixed one."""

DEFAULT_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: retries after the first attempt on one backend (0: a single attempt)
    retries: int = 2
    #: the first retry waits up to this long; each later one up to twice the previous cap
    base_s: float = 0.1
    #: no wait is longer than this; an upstream Retry-After above it is not waited for
    max_s: float = 2.0
    #: upstream statuses that count as "no answer yet" and are retried (and fail over)
    statuses: frozenset[int] = DEFAULT_STATUSES

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.base_s <= 0 or self.max_s <= 0:
            raise ValueError("backoff times must be positive")

    def retryable(self, status: int) -> bool:
        return status in self.statuses

    def cap(self, retry: int) -> float:
        """The longest wait before retry number ``retry`` (1-based)."""
        exponent = min(max(retry - 1, 0), 62)   # no float overflow for absurd counts
        return min(self.max_s, self.base_s * math.pow(2, exponent))

    def delay(self, failures: int, rand: Random, retry_after: float | None = None) -> float | None:
        """Seconds to wait before the next attempt after ``failures`` failed ones, or None when
        this backend should not be tried again for this request.

        An upstream ``Retry-After`` no longer than ``max_s`` is honoured as it is; a longer one
        means "not now": no retry here (the router fails over or returns the answer)."""
        if failures < 1 or failures > self.retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_s else None
        return rand() * self.cap(failures)


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds an upstream asked us to wait (``retry-after-ms``, ``Retry-After`` as seconds or as
    an HTTP date relative to ``now``, wall-clock seconds); None when absent or unreadable."""
    lowered = {k.lower(): v for k, v in headers.items()}
    value = lowered.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000
    value = lowered.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
