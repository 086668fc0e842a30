"""The backend the pipeline sees: routing by model name, ordered failover, retries before the
first byte, a circuit breaker per backend, and health probes of each backend's own endpoint.

For one request the router tries every backend whose model patterns match, in config order
(``Config.backends_for``). A backend whose breaker is open is skipped. On one backend a call is
tried again, after a full-jitter backoff (``retry.RetryPolicy``), when it got no HTTP answer
(``BackendFailure``/``BackendTimeout``) or an answer whose status is in the backend's
``retry_statuses`` (502, 503, 504 by default); when the retries there are used up, or the breaker
opens meanwhile, the next backend gets the request. Any other answer (200, 4xx, 429 with its
Retry-After, other 5xx) is returned as it is, at once. When every candidate is open the client
gets 503 + Retry-After without any call being made.

Why retrying here is safe: ``send`` returns when the upstream's response headers arrive (the
whole body when not streaming). Everything retried happens inside ``send``, so before the
pipeline has published anything to any client. Once ``send`` has returned a streaming response,
its chunks belong to the pipeline, which never calls ``send`` again for that request: a stream
that breaks after its first byte ends with an in-band error event, never with a second call whose
answer could differ from what the client already read.

Each ``route()`` returns a small per-request ``Route`` whose ``name`` becomes the backend that
actually answered (or the last one tried), so the pipeline's metrics and accounting name the
right backend after failover. The health probe task belongs to the router: started by
``start()``, cancelled and awaited by ``close()``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..breaker import Breaker, BreakerSettings, BreakerState
from ..config import Config
from ..errors import BackendFailure, BackendsUnavailable, BackendTimeout, ProxyError
from ..ports import Backend, Metrics, UpstreamRequest, UpstreamResponse
from ..retry import Random, RetryPolicy, retry_after_seconds

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]
"""One health check of a backend: True when it answered as healthy."""
StateListener = Callable[[str, str, str], None]
"""Told (backend, breaker state, last health probe) whenever either changes."""
Sleep = Callable[[float], Awaitable[None]]
SETTLE_TIMEOUT_S = 5.0         # reading the body of a streamed error answer that will be retried
SETTLE_MAX_BYTES = 64 * 1024
_ROUTE_MEMO = 1024              # model names remembered with their backends
WAKE_SLACK_S = 0.01            # look at an open breaker this long after its cool-down ends


@dataclass(eq=False)
class Member:
    """One backend as the router keeps it."""

    name: str
    backend: Backend
    breaker: Breaker
    policy: RetryPolicy
    probe: Probe | None = None
    health: str = "unknown"             # result of the last probe: ok | failing | unknown
    reported: tuple[str, str] | None = field(default=None, repr=False)   # last (state, health) told
    wake: asyncio.TimerHandle | None = field(default=None, repr=False)   # tells open -> half_open


@dataclass(frozen=True, slots=True)
class _Skipped:
    retry_after: float


@dataclass(frozen=True, slots=True)
class _Failed:
    outcome: UpstreamResponse | ProxyError


class Route:
    """One request's view of the router; implements the ``Backend`` port."""

    __slots__ = ("_router", "members", "served_by")

    def __init__(self, router: Router, members: Sequence[Member]) -> None:
        self._router = router
        self.members = members
        self.served_by = members[0].name

    @property
    def name(self) -> str:
        """The backend that answered (or was tried last); the first candidate before ``send``."""
        return self.served_by

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        return await self._router.send_via(self, request)

    async def start(self) -> None:
        """Nothing to do: the router owns the backends' lifecycle."""

    async def close(self) -> None:
        """Nothing to do: the router owns the backends' lifecycle."""


class Router:
    def __init__(self, members: Sequence[Member], select: Callable[[str], Sequence[str]], *,
                 metrics: Metrics, health_interval_s: float = 0.0, rand: Random = random.random,
                 wall: Callable[[], float] = time.time, sleep: Sleep = asyncio.sleep,
                 on_state: StateListener | None = None) -> None:
        if not members:
            raise ValueError("a router needs at least one backend")
        self._members = {member.name: member for member in members}
        self._order = tuple(members)
        self._select = select
        self._metrics = metrics
        self._interval = health_interval_s
        self._rand = rand
        self._wall = wall
        self._sleep = sleep
        self._on_state = on_state
        self._health_task: asyncio.Task[None] | None = None
        self._routes: dict[str, tuple[Member, ...]] = {}

    # -- the Backend port, per request ------------------------------------------------------

    def route(self, model: str) -> Route:
        members = self._routes.get(model)
        if members is None:
            # pattern matching per request showed in the hit path's profile; model names come
            # from clients, so the memo is bounded
            if len(self._routes) >= _ROUTE_MEMO:
                self._routes.clear()
            names = self._select(model)
            chosen = tuple(self._members[name] for name in names if name in self._members)
            members = self._routes[model] = chosen or self._order[:1]
        return Route(self, members)

    async def send_via(self, route: Route, request: UpstreamRequest) -> UpstreamResponse:
        last: _Failed | None = None
        waits: list[float] = []
        for index, member in enumerate(route.members):
            if index:
                self._metrics.failover(route.members[index - 1].name)
            tried = await self._try(member, request)
            if isinstance(tried, UpstreamResponse):
                route.served_by = member.name
                return tried
            if isinstance(tried, _Skipped):
                waits.append(tried.retry_after)
                continue
            route.served_by = member.name
            last = tried
        if last is None:
            names = ", ".join(member.name for member in route.members)
            raise BackendsUnavailable(
                f"No backend is available for this model right now ({names}: circuit open); "
                "retry later.", retry_after=max(1.0, min(waits, default=1.0)))
        if isinstance(last.outcome, UpstreamResponse):
            return last.outcome      # the upstream's own 502/503/504, passed through
        raise last.outcome

    async def _try(self, member: Member, request: UpstreamRequest) -> UpstreamResponse | _Skipped | _Failed:
        """Attempts on one backend: an answer to return, or why to move on."""
        breaker = member.breaker
        failures = 0
        outcome: UpstreamResponse | ProxyError | None = None
        while True:
            if not breaker.allow():
                self._observe(member)
                return _Skipped(breaker.retry_after()) if outcome is None else _Failed(outcome)
            retry_after: float | None = None
            try:
                resp = await member.backend.send(request)
            except BackendFailure as exc:
                breaker.failure()
                outcome = exc
                reason = "timeout" if isinstance(exc, BackendTimeout) else "unreachable"
            except ProxyError as exc:
                # refused before reaching the backend (e.g. its batch queue is full): no verdict
                # on its health, and no point in trying it again at once
                breaker.cancel()
                self._observe(member)
                return _Failed(exc)
            except BaseException:
                breaker.cancel()     # cancelled (every client left) or a bug: no verdict
                raise
            else:
                if not member.policy.retryable(resp.status):
                    breaker.success()
                    self._observe(member)
                    return resp
                breaker.failure()
                outcome = await _settle(resp)
                reason = f"http_{resp.status}"
                retry_after = retry_after_seconds(resp.headers, self._wall())
            self._observe(member)
            failures += 1
            delay = member.policy.delay(failures, self._rand, retry_after)
            if delay is None or breaker.state is BreakerState.OPEN:
                return _Failed(outcome)
            self._metrics.retry(member.name, reason)
            log.debug("backend %s: %s, retry %d in %.3f s", member.name, reason, failures, delay)
            await self._sleep(delay)

    # -- lifecycle and health ---------------------------------------------------------------

    async def start(self) -> None:
        for member in self._order:
            await member.backend.start()
        for member in self._order:
            self._observe(member, force=True)
        if self._interval > 0 and any(member.probe is not None for member in self._order):
            self._health_task = asyncio.create_task(self._health_loop(), name="backend-health")

    async def close(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for member in self._order:
            if member.wake is not None:
                member.wake.cancel()
                member.wake = None
        for member in self._order:
            await member.backend.close()

    def states(self) -> dict[str, str]:
        """Breaker state per backend: closed | open | half_open."""
        return {name: member.breaker.state.value for name, member in self._members.items()}

    def health(self) -> dict[str, str]:
        """The last health probe per backend: ok | failing | unknown (not probed)."""
        return {name: member.health for name, member in self._members.items()}

    async def check_health(self) -> None:
        """Probe every backend that has a probe once, concurrently, and update the breakers:
        a failed probe counts as one failed call (so a dead idle backend opens after
        ``failures`` probes); a passing probe moves an open backend to half-open (its next call
        is the probe call) and a half-open one to closed."""
        members = [member for member in self._order if member.probe is not None]
        results = await asyncio.gather(*(_probe(member) for member in members))
        for member, healthy in zip(members, results, strict=True):
            previous, member.health = member.health, "ok" if healthy else "failing"
            if healthy:
                member.breaker.recover()
            else:
                member.breaker.failure()
            if member.health != previous:
                log.log(logging.INFO if healthy else logging.WARNING, "backend %s health: %s",
                        member.name, member.health)
        for member in self._order:
            self._observe(member)

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:  # a probe must never take the loop down
                log.exception("backend health check failed")
            await asyncio.sleep(self._interval)

    def _observe(self, member: Member, force: bool = False) -> None:
        state = member.breaker.state.value
        now = (state, member.health)
        if now == member.reported and not force:
            return
        before = member.reported[0] if member.reported is not None else None
        if before is not None and state != before:
            level = logging.WARNING if state == "open" else logging.INFO
            log.log(level, "backend %s: circuit %s -> %s", member.name, before, state)
        member.reported = now
        self._metrics.backend_state(member.name, state)
        if self._on_state is not None:
            self._on_state(member.name, state, member.health)
        if state == BreakerState.OPEN:
            self._wake_later(member)

    def _wake_later(self, member: Member) -> None:
        """An open breaker turns half-open by the clock alone: look again when it does, so the
        gauge and /readyz follow without traffic or health probes."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if member.wake is not None:
            member.wake.cancel()
        member.wake = loop.call_later(member.breaker.retry_after() + WAKE_SLACK_S, self._observe, member)


async def _probe(member: Member) -> bool:
    assert member.probe is not None
    try:
        return await member.probe()
    except Exception:
        log.exception("health probe of backend %s raised", member.name)
        return False


async def _settle(resp: UpstreamResponse) -> UpstreamResponse:
    """Keep a retried answer (to pass it on if nothing better comes) with its connection freed."""
    if resp.chunks is None:
        return resp
    body = b""
    chunks = resp.chunks
    try:
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            async for data in chunks:
                body += data
                if len(body) > SETTLE_MAX_BYTES:
                    break
    except (TimeoutError, ProxyError):
        pass
    finally:
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            await closer()
        released = resp.release() if resp.release is not None else None
        if inspect.isawaitable(released):
            await released
    return UpstreamResponse(resp.status, resp.headers, body=body)


def build_router(config: Config, backends: Mapping[str, Backend], *, metrics: Metrics,
                 probes: Mapping[str, Probe] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_state: StateListener | None = None) -> Router:
    """The router for ``config.backends``: one breaker and retry policy per backend, from its
    config; ``backends`` and ``probes`` are keyed by backend name."""
    probes = probes or {}
    members = []
    for cfg in config.backends:
        breaker = Breaker(BreakerSettings(failures_to_open=cfg.breaker.failures,
                                          open_s=cfg.breaker.open_s), clock)
        policy = RetryPolicy(retries=cfg.retries, base_s=cfg.backoff_base_s, max_s=cfg.backoff_max_s,
                             statuses=frozenset(cfg.retry_statuses))
        members.append(Member(cfg.name, backends[cfg.name], breaker, policy,
                              probe=probes.get(cfg.name) if cfg.health_url_path() else None))
    return Router(members, lambda model: [cfg.name for cfg in config.backends_for(model)],
                  metrics=metrics, health_interval_s=config.routing.health_interval_s,
                  on_state=on_state)
