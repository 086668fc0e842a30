"""The circuit breaker as a table of (step, expected state) runs over a fake clock."""

from __future__ import annotations

import pytest

from proxy.breaker import PROBE_WAIT_S, Breaker, BreakerSettings, BreakerState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CL, OP, HO = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

# Each step: an action, then the state expected after it. Actions:
#   "ok" / "fail" / "cancel" / "trip" / "recover": report to the breaker
#   "allow" / "deny": call allow() and expect True / False
#   "+N": advance the clock N seconds
# Settings for every case: 3 failures open it, it stays open 10 s.
CASES: dict[str, list[tuple[str, BreakerState]]] = {
    "starts closed and allows": [("allow", CL), ("allow", CL)],
    "opens after N consecutive failures": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("deny", OP)],
    "a success resets the count": [
        ("fail", CL), ("fail", CL), ("ok", CL), ("fail", CL), ("fail", CL), ("allow", CL), ("fail", OP)],
    "stays open during the cool-down": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("+9.9", OP), ("deny", OP)],
    "half-open after the cool-down, one probe only": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("+10", HO), ("allow", HO), ("deny", HO), ("deny", HO)],
    "a successful probe closes it": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("+10", HO), ("allow", HO), ("ok", CL), ("allow", CL),
        ("allow", CL)],
    "a failed probe reopens it for a full cool-down": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("+10", HO), ("allow", HO), ("fail", OP), ("+9", OP),
        ("deny", OP), ("+1", HO), ("allow", HO)],
    "after reopening, one failure is not enough to count from zero wrongly": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("+10", HO), ("allow", HO), ("ok", CL), ("fail", CL),
        ("fail", CL), ("fail", OP)],
    "a cancelled probe frees the slot": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("+10", HO), ("allow", HO), ("deny", HO), ("cancel", HO),
        ("allow", HO)],
    "a probe that never reports stops blocking after the cool-down": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("+10", HO), ("allow", HO), ("+5", HO), ("deny", HO),
        ("+5", HO), ("allow", HO)],
    "trip opens at once": [("trip", OP), ("deny", OP), ("+10", HO)],
    "trip while half-open reopens": [
        ("trip", OP), ("+10", HO), ("allow", HO), ("trip", OP), ("deny", OP)],
    "recover lets a probe through before the cool-down ends": [
        ("trip", OP), ("+1", OP), ("recover", HO), ("allow", HO), ("deny", HO), ("ok", CL)],
    "two passing health checks close it, even with the probe call still out": [
        ("trip", OP), ("recover", HO), ("allow", HO), ("deny", HO), ("recover", CL), ("allow", CL)],
    "a failed probe after one passing check reopens": [
        ("trip", OP), ("recover", HO), ("allow", HO), ("fail", OP), ("recover", HO)],
    "recover on a closed breaker changes nothing": [
        ("fail", CL), ("recover", CL), ("fail", CL), ("fail", OP)],
    "late results of calls allowed before opening do not move an open breaker": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("ok", OP), ("fail", OP), ("+10", HO)],
    "late failure does not extend the cool-down": [
        ("fail", CL), ("fail", CL), ("fail", OP), ("+5", OP), ("fail", OP), ("+5", HO)],
    "cancel while closed counts nothing": [("fail", CL), ("fail", CL), ("cancel", CL), ("fail", OP)],
}


def run(steps: list[tuple[str, BreakerState]]) -> None:
    clock = FakeClock()
    breaker = Breaker(BreakerSettings(failures_to_open=3, open_s=10.0), clock)
    for number, (action, expected) in enumerate(steps):
        if action.startswith("+"):
            clock.now += float(action[1:])
        elif action == "allow":
            assert breaker.allow(), f"step {number}: allow() refused"
        elif action == "deny":
            assert not breaker.allow(), f"step {number}: allow() accepted"
        else:
            {"ok": breaker.success, "fail": breaker.failure, "cancel": breaker.cancel,
             "trip": breaker.trip, "recover": breaker.recover}[action]()
        assert breaker.state is expected, f"step {number} ({action}): {breaker.state} != {expected}"


@pytest.mark.parametrize("name", list(CASES))
def test_breaker(name: str) -> None:
    run(CASES[name])


def test_retry_after_counts_down_the_cool_down() -> None:
    clock = FakeClock()
    breaker = Breaker(BreakerSettings(failures_to_open=1, open_s=30.0), clock)
    assert breaker.retry_after() == 0.0
    breaker.failure()
    assert breaker.retry_after() == pytest.approx(30.0)
    clock.now += 12
    assert breaker.retry_after() == pytest.approx(18.0)
    clock.now += 18
    assert breaker.retry_after() == 0.0          # half-open: a call may go now
    assert breaker.allow()
    assert 0 < breaker.retry_after() <= PROBE_WAIT_S  # the probe is out: ask again soon


@pytest.mark.parametrize(("failures", "open_s"), [(0, 1.0), (1, 0.0), (-1, 5.0)])
def test_settings_are_validated(failures: int, open_s: float) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(failures_to_open=failures, open_s=open_s)
