"""Single-flight: one backend call shared by every request waiting for the same answer.

A ``Flight`` is the backend call itself, run as its own task so that no single client owns it:
the first request and every later joiner are equal subscribers. Stream subscribers read events as
they are published (from the first one, live); JSON subscribers wait for the outcome. When the last
subscriber leaves before the end, the call is cancelled.

``FlightTable`` finds a flight by exact key, or by embedding similarity within the same scope
(semantic coalescing), so near-identical questions asked at the same moment share one call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BackendFailure, ProxyError
from .ports import Vector

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[Any]"]


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes
    usage_only: bool = False     # the usage chunk the proxy asked for on the client's behalf


@dataclass(slots=True)
class Outcome:
    status: int
    headers: dict[str, str]
    body: bytes = b""                    # the upstream's JSON (or error) body, when not streamed
    answer: dict[str, Any] | None = None  # the complete answer, when it is one
    error: ProxyError | None = None      # no usable answer: raised to JSON subscribers


@dataclass(eq=False)
class Flight:
    key: str
    scope: str | None
    vector: Vector | None
    streaming: bool                      # how the backend is asked
    text: str | None = None              # the semantic text, for guards on coalescing
    events: list[Event] = field(default_factory=list)
    outcome: Outcome | None = None
    head: tuple[int, dict[str, str]] | None = None
    subscribers: int = 0
    joined: int = 0                      # subscribers beyond the first, for metrics
    task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _on_abandon: Callable[[Flight], None] | None = None

    # -- publishing (the flight's own task) ---------------------------------------------

    def publish_head(self, status: int, headers: dict[str, str]) -> None:
        self.head = (status, headers)
        self._notify()

    def publish(self, event: Event) -> None:
        self.events.append(event)
        self._notify()

    def finish(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            if self.head is None:
                self.head = (outcome.status, outcome.headers)
            self._notify()

    def abandon(self) -> None:
        """End a call that stopped (cancelled, crashed) before it finished: wake anyone waiting.
        A no-op once the call has its outcome."""
        if self.outcome is None:
            self.finish(Outcome(502, {}, error=BackendFailure("the backend call was abandoned")))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- subscribing ------------------------------------------------------------------------

    def subscribe(self) -> None:
        if self.subscribers or self.joined or self.outcome is not None:
            self.joined += 1
        self.subscribers += 1

    def unsubscribe(self) -> None:
        self.subscribers -= 1
        if self.subscribers <= 0 and self.outcome is None and self.task is not None:
            # nobody is left to read the answer: stop paying for it
            self.task.cancel()
            if self._on_abandon is not None:
                self._on_abandon(self)

    async def wait_head(self) -> tuple[int, dict[str, str]]:
        while self.head is None:
            await self._changed.wait()
        return self.head

    async def wait_outcome(self) -> Outcome:
        while self.outcome is None:
            await self._changed.wait()
        return self.outcome

    async def follow(self) -> AsyncIterator[list[Event]]:
        """Every event from the first, live, until the flight ends; each step yields all the
        events published since the last one, so a subscriber can write them in one go."""
        sent = 0
        while True:
            if sent < len(self.events):
                fresh = self.events[sent:]
                sent += len(fresh)
                yield fresh
            if self.outcome is not None and sent == len(self.events):
                return
            if sent == len(self.events):
                await self._changed.wait()


class FlightTable:
    def __init__(self, spawn: Spawn) -> None:
        self._spawn = spawn
        self._by_key: dict[str, Flight] = {}
        self._by_scope: dict[str, list[Flight]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def find(self, key: str) -> Flight | None:
        return self._by_key.get(key)

    def find_similar(self, scope: str, vector: Vector, threshold: float) -> tuple[Flight, float] | None:
        best: tuple[Flight, float] | None = None
        for flight in self._by_scope.get(scope, ()):
            # a finished flight stays joinable while its answer is being stored
            failed = flight.outcome is not None and flight.outcome.answer is None
            if flight.vector is None or failed:
                continue
            score = float(np.dot(flight.vector, vector))
            if score >= threshold and (best is None or score > best[1]):
                best = (flight, score)
        return best

    def start(self, flight: Flight, work: Coroutine[Any, Any, None], *, shared: bool) -> Flight:
        """Run ``work`` as the flight's task; a shared flight can be found until it ends."""
        if shared:
            self._by_key[flight.key] = flight
            if flight.scope is not None and flight.vector is not None:
                self._by_scope.setdefault(flight.scope, []).append(flight)
            flight._on_abandon = self._remove
        flight.task = self._spawn(work)
        flight.task.add_done_callback(lambda _: self._done(flight))
        return flight

    def _done(self, flight: Flight) -> None:
        self._remove(flight)
        flight.abandon()

    def _remove(self, flight: Flight) -> None:
        if self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]
        if flight.scope is not None:
            flights = self._by_scope.get(flight.scope)
            if flights and flight in flights:
                flights.remove(flight)
                if not flights:
                    del self._by_scope[flight.scope]
