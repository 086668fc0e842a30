"""A circuit breaker per backend: a pure state machine over an injected monotonic clock.

    closed    --N consecutive failures / trip()-->  open
    open      --open_s elapsed, or recover()----->  half_open   (one probe call is let through)
    half_open --probe succeeds, or recover()----->  closed
    half_open --probe fails, or trip()----------->  open        (the cool-down starts again)

``allow()`` asks before a call; the caller then reports exactly one of ``success()``,
``failure()`` or ``cancel()`` (the call ended without a verdict, e.g. the client left). In
half-open only one call is allowed at a time: the others are told no until the probe reports.
A probe that never reports (a bug, a lost task) stops blocking after ``open_s``.

"Failure" means the backend gave no usable answer (no HTTP answer, or a status the caller counts
as unavailable, such as 502/503/504). An answer of any other status, a 4xx included, is a success:
the backend is up and talking. Nothing here does I/O or reads the time by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

#: what retry_after() suggests while a half-open probe is out
PROBE_WAIT_S = 1.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    #: consecutive failures that open the breaker
    failures_to_open: int = 5
    #: how long an open breaker refuses calls before it lets one probe through
    open_s: float = 30.0

    def __post_init__(self) -> None:
        if self.failures_to_open < 1:
            raise ValueError("failures_to_open must be at least 1")
        if self.open_s <= 0:
            raise ValueError("open_s must be positive")


class Breaker:
    __slots__ = ("_clock", "_failures", "_opened_at", "_probe_at", "_settings", "_state")

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0                    # consecutive, while closed
        self._opened_at = 0.0
        self._probe_at: float | None = None   # when the half-open probe was let through

    @property
    def settings(self) -> BreakerSettings:
        return self._settings

    @property
    def failures(self) -> int:
        return self._failures

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker whose cool-down has passed reads as half-open."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._settings.open_s:
            self._state = BreakerState.HALF_OPEN
            self._probe_at = None
        return self._state

    def allow(self) -> bool:
        """May a call go to this backend now? In half-open, a yes takes the single probe slot."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        now = self._clock()
        if self._probe_at is not None and now - self._probe_at < self._settings.open_s:
            return False          # a probe is already out
        self._probe_at = now
        return True

    def success(self) -> None:
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._close()
        elif state is BreakerState.CLOSED:
            self._failures = 0
        # open: a call allowed before the breaker opened came back late; the cool-down stands

    def failure(self) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self._failures += 1
            if self._failures >= self._settings.failures_to_open:
                self._open()
        elif state is BreakerState.HALF_OPEN:
            self._open()
        # open: a late failure of a call allowed before; already open, the cool-down stands

    def cancel(self) -> None:
        """An allowed call ended without a verdict: free the probe slot, count nothing."""
        if self.state is BreakerState.HALF_OPEN:
            self._probe_at = None

    def trip(self) -> None:
        """Open now, whatever the count (the backend's own health check failed)."""
        self._open()

    def recover(self) -> None:
        """The backend's health check passed. An open breaker lets a probe call through now
        instead of waiting out its cool-down; a half-open one closes. So two passing checks in a
        row close it even while the probe call is still out: a non-streaming completion can take
        a minute, and traffic should not wait for that one answer to come back."""
        state = self.state
        if state is BreakerState.OPEN:
            self._state = BreakerState.HALF_OPEN
            self._probe_at = None
        elif state is BreakerState.HALF_OPEN:
            self._close()

    def retry_after(self) -> float:
        """Seconds until this breaker lets a call through (0 when it would now)."""
        state = self.state
        now = self._clock()
        if state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self._settings.open_s - now)
        if state is BreakerState.HALF_OPEN and self._probe_at is not None:
            # the probe's verdict usually comes within a call's time; ask again soon
            return min(PROBE_WAIT_S, max(0.0, self._probe_at + self._settings.open_s - now))
        return 0.0

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._probe_at = None
        self._failures = 0

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_at = None
