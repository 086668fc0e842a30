"""The real clock; tests hand components a fake one through ``ports.Clock`` instead."""

from __future__ import annotations

import time


class SystemClock:
    """Wall-clock time for entry timestamps, monotonic time for durations."""

    __slots__ = ()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
