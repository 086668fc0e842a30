"""The retry policy: which statuses, how many times, full-jitter waits, Retry-After parsing."""

from __future__ import annotations

import email.utils
import random

import pytest

from proxy.retry import RetryPolicy, retry_after_seconds

POLICY = RetryPolicy(retries=3, base_s=0.1, max_s=1.0)


@pytest.mark.parametrize(("status", "retryable"), [
    (502, True), (503, True), (504, True),
    (200, False), (400, False), (401, False), (404, False), (429, False), (500, False), (501, False),
])
def test_default_statuses(status: int, retryable: bool) -> None:
    assert POLICY.retryable(status) is retryable


def test_429_can_be_opted_in() -> None:
    assert RetryPolicy(statuses=frozenset({429, 503})).retryable(429)


@pytest.mark.parametrize(("retry", "cap"), [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (60, 1.0),
                                            (10_000, 1.0)])
def test_cap_doubles_up_to_the_maximum(retry: int, cap: float) -> None:
    assert POLICY.cap(retry) == pytest.approx(cap)


@pytest.mark.parametrize(("rand", "failures", "expected"), [
    (0.0, 1, 0.0),            # full jitter reaches down to zero
    (0.5, 1, 0.05),
    (0.999, 2, 0.1998),
    (0.5, 3, 0.2),
])
def test_full_jitter_scales_the_cap(rand: float, failures: int, expected: float) -> None:
    assert POLICY.delay(failures, lambda: rand) == pytest.approx(expected)


def test_no_delay_once_the_retries_are_used() -> None:
    assert POLICY.delay(3, lambda: 0.5) is not None
    assert POLICY.delay(4, lambda: 0.5) is None
    assert POLICY.delay(0, lambda: 0.5) is None
    assert RetryPolicy(retries=0).delay(1, lambda: 0.5) is None


def test_jitter_stays_within_the_cap_and_spreads() -> None:
    rng = random.Random(7)
    waits = [POLICY.delay(2, rng.random) for _ in range(2000)]
    assert all(w is not None and 0.0 <= w <= 0.2 for w in waits)
    values = [w for w in waits if w is not None]
    assert min(values) < 0.01 and max(values) > 0.19          # the whole interval is used
    assert 0.09 < sum(values) / len(values) < 0.11            # mean of uniform(0, 0.2)


@pytest.mark.parametrize(("retry_after", "expected"), [(0.5, 0.5), (1.0, 1.0), (1.5, None), (30.0, None)])
def test_retry_after_is_honoured_only_within_the_maximum(retry_after: float, expected: float | None) -> None:
    assert POLICY.delay(1, lambda: 0.0, retry_after=retry_after) == expected


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, None),
    ({"retry-after": "7"}, 7.0),
    ({"Retry-After": " 2.5 "}, 2.5),
    ({"retry-after": "-1"}, None),
    ({"retry-after": "nan"}, None),
    ({"retry-after": "inf"}, None),
    ({"retry-after": "soon"}, None),
    ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
    ({"retry-after-ms": "bogus", "retry-after": "9"}, 9.0),
    ({"retry-after": email.utils.formatdate(1_000_030.0, usegmt=True)}, 30.0),
    ({"retry-after": email.utils.formatdate(999_000.0, usegmt=True)}, 0.0),
])
def test_retry_after_seconds(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers, now=1_000_000.0) == expected


@pytest.mark.parametrize("kwargs", [{"retries": -1}, {"base_s": 0.0}, {"max_s": -1.0}])
def test_policy_is_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
