"""PURE: per-tenant token buckets, with an injected clock.

Each tenant has a bucket of ``burst`` tokens refilled at ``rate`` tokens per second; a request
takes one. An empty bucket answers how long until the next token, which the proxy sends as
``Retry-After`` with a 429. At most ``max_tenants`` buckets are kept: the least recently used one
is forgotten first. A bucket untouched for ``burst / rate`` seconds is full again anyway, so
forgetting it loses nothing; only when more than ``max_tenants`` tenants are active within that
window does a forgotten tenant get a fresh (full) bucket early - memory stays bounded either way.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RateLimited


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, *, rate: float, burst: float, max_tenants: int,
                 clock: Callable[[], float]) -> None:
        if rate <= 0 or burst < 1 or max_tenants < 1:
            raise ValueError("rate must be positive, burst at least 1 and max_tenants at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._max_tenants = max_tenants
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """Tenants tracked now (never more than ``max_tenants``)."""
        return len(self._buckets)

    def take(self, tenant: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens from the tenant's bucket: 0.0 when granted, else the seconds until
        enough tokens are there (nothing is taken then)."""
        now = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[tenant] = bucket
            while len(self._buckets) > self._max_tenants:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(tenant)
            # a clock that steps back never adds tokens
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(self._burst, bucket.tokens + elapsed * self._rate)
            bucket.stamp = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        return (cost - bucket.tokens) / self._rate

    def check(self, tenant: str) -> None:
        """Take one token or raise ``RateLimited`` with a whole-second Retry-After that is never
        too early (the wait rounded up, at least 1 s)."""
        wait = self.take(tenant)
        if wait > 0:
            raise RateLimited("Rate limit reached for this API key; retry later.",
                              retry_after=max(1, math.ceil(wait)))
