"""Per-tenant token buckets (proxy/ratelimit.py) with a hand-driven clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import RateLimited
from proxy.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, rate: float = 2.0, burst: int = 3, max_tenants: int = 100) -> RateLimiter:
    return RateLimiter(rate=rate, burst=burst, max_tenants=max_tenants, clock=clock)


def test_burst_then_refused_with_the_time_to_the_next_token() -> None:
    clock = Clock()
    buckets = limiter(clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)    # one token per 0.5 s at 2/s
    clock.now += 0.25
    assert buckets.take("a") == pytest.approx(0.25)   # half a token there: a refusal takes nothing
    clock.now += 0.25
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0


def test_tenants_have_their_own_buckets() -> None:
    clock = Clock()
    buckets = limiter(clock, burst=1)
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    assert buckets.take("b") == 0.0   # a's empty bucket is not b's


def test_refill_never_exceeds_the_burst() -> None:
    clock = Clock()
    buckets = limiter(clock)
    buckets.take("a")
    clock.now += 3600
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") > 0


def test_a_clock_stepping_back_adds_nothing() -> None:
    clock = Clock()
    buckets = limiter(clock, burst=1)
    buckets.take("a")
    clock.now -= 100
    assert buckets.take("a") > 0
    clock.now += 0.5
    assert buckets.take("a") == 0.0


def test_tracked_tenants_are_bounded_least_recent_first() -> None:
    clock = Clock()
    buckets = limiter(clock, burst=1, max_tenants=3)
    for name in ("a", "b", "c"):
        buckets.take(name)
    buckets.take("a")            # a is the most recent now (and refused)
    buckets.take("d")            # b, the least recent, is forgotten
    assert len(buckets) == 3
    assert buckets.take("a") > 0  # still tracked: still empty
    assert buckets.take("b") == 0.0  # forgotten: a fresh bucket


def test_many_tenants_stay_within_the_bound() -> None:
    clock = Clock()
    buckets = limiter(clock, max_tenants=50)
    for i in range(10_000):
        buckets.take(f"t{i}")
    assert len(buckets) == 50


def test_check_raises_429_with_a_whole_second_retry_after_never_too_early() -> None:
    clock = Clock()
    buckets = limiter(clock, rate=0.4, burst=1)
    buckets.check("a")
    with pytest.raises(RateLimited) as refused:
        buckets.check("a")
    assert refused.value.status == 429
    assert refused.value.headers() == {"Retry-After": "3"}   # 2.5 s rounded up
    body = refused.value.body()["error"]
    assert body["type"] == "rate_limit_error" and body["code"] == "rate_limited"
    clock.now += 3
    buckets.check("a")


@pytest.mark.parametrize(("rate", "burst", "max_tenants"), [(0, 1, 1), (-1, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_bad_settings_are_refused(rate: float, burst: int, max_tenants: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=rate, burst=burst, max_tenants=max_tenants, clock=Clock())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 5)), max_size=200),
       st.floats(0.1, 50), st.integers(1, 20))
def test_grants_never_exceed_burst_plus_rate_times_elapsed(steps: list[tuple[str, float]], rate: float,
                                                           burst: int) -> None:
    clock = Clock()
    buckets = limiter(clock, rate=rate, burst=burst)
    start = clock.now
    granted: dict[str, int] = {}
    for tenant, advance in steps:
        clock.now += advance
        wait = buckets.take(tenant)
        assert wait >= 0
        if wait == 0:
            granted[tenant] = granted.get(tenant, 0) + 1
    for count in granted.values():
        assert count <= burst + rate * (clock.now - start) + 1e-6
