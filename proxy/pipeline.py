"""The use case: answer one completion request from the cache, or from a backend and remember it.

Works through the ports only; routes.py turns a ``Reply`` into HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from . import streaming
from .accounting import PriceTable, account
from .cache import Explanation, Hit, RecentHits, SemanticCache
from .cachekey import Directives, Plan, Rules, canonical_json, effective_threshold, plan
from .config import CacheConfig
from .errors import BackendFailure, ProxyError
from .flight import Event, Flight, FlightTable, Outcome
from .guards import NO_GUARDS, Guards, check
from .ports import Backend, Clock, Entry, Leases, Metrics, UpstreamRequest, UpstreamResponse, Vector
from .tasks import TaskTracker

log = logging.getLogger(__name__)

SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}
JSON_TYPE = "application/json"
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True, slots=True)
class Policy:
    """The reloadable part of the configuration that decides caching per request."""

    cache: CacheConfig
    rules: Rules
    guards: Guards = NO_GUARDS


@dataclass(frozen=True, slots=True)
class ApiRequest:
    route: str                      # "chat" | "completions"
    body: Mapping[str, Any]         # validated JSON
    raw: bytes                      # the body as received
    headers: Mapping[str, str]
    tenant: str
    upstream_auth: str | None
    directives: Directives
    started: float                  # monotonic


@dataclass(frozen=True, slots=True)
class _Target:
    """A cacheable miss: where its answer goes, and what may share its backend call."""

    plan: Plan
    vector: Vector | None     # computed by the lookup, reused for the store and for coalescing
    embed: bool               # False when the lookup found the text too long to embed
    threshold: float = 1.0    # similarity a concurrent request needs to share this call
    join: bool = False        # may share an in-flight call for the same exact key
    lease: bool = False       # may wait for another replica's call (the lookup reached the store)
    coalesce: bool = False    # may share an in-flight call for a similar question


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncGenerator[bytes, None] | None = None
    result: str = "miss"            # exact | semantic | miss | bypass | error
    tokens: Mapping[str, Any] = field(default_factory=dict)


class EnergyMeter(Protocol):
    """Measures the energy of backend calls (proxy/energy.py: NVML on a local GPU)."""

    def track(self, backend: str, work: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
        """Run one backend call's work as a measured call."""
        ...

    def take(self, backend: str) -> float | None:
        """From inside that work: end the measurement; IT joules, or None when not measured."""
        ...


class Pipeline:
    def __init__(self, *, cache: SemanticCache | None, route_backend: Callable[[str], Backend],
                 metrics: Metrics, clock: Clock, policy: Callable[[], Policy],
                 tasks: TaskTracker, prices: PriceTable | None = None,
                 energy: EnergyMeter | None = None, leases: Leases | None = None,
                 lease_wait_s: float = 60.0, lease_poll_s: float = 0.05) -> None:
        self._cache = cache
        # cross-replica single-flight (a shared store): see _fly
        self._leases = leases
        self._lease_wait_s = lease_wait_s
        self._lease_poll_s = lease_poll_s
        self._route_backend = route_backend
        self._metrics = metrics
        self._clock = clock
        self._policy = policy
        self._tasks = tasks
        self._prices = prices or PriceTable()
        self._energy = energy
        self._unpriced: set[str] = set()
        self._flights = FlightTable(spawn=lambda work: tasks.spawn(work, name="flight"))
        self._recent = RecentHits()  # semantic hits, for feedback (retry and admin)

    def _account(self, usage: Mapping[str, Any], req: ApiRequest, source: str,
                 backend: str | None = None) -> None:
        """Spent (backend) or saved (cache, coalesced): tokens, USD, joules, CO2."""
        model = str(req.body["model"])
        name = backend or self._route_backend(model).name
        measured = self._energy.take(name) if self._energy is not None and source == "backend" else None
        figures = account(usage, model, name, self._prices, measured_joules=measured)
        if not figures.priced and model not in self._unpriced and len(self._unpriced) < 1000:
            self._unpriced.add(model)
            log.warning("model %r has no price in the price table: its cost is reported as unpriced",
                        model[:100])
        self._metrics.usage(figures, source)

    def backend_for(self, model: str | None) -> Backend:
        return self._route_backend(model or "")

    async def complete(self, req: ApiRequest) -> Reply:
        policy = self._policy()
        model = str(req.body["model"])
        if self._cache is None or not policy.cache.enabled:
            self._metrics.bypass("disabled")
            self._metrics.lookup("bypass")
            return await self._forward(req, None, "bypass")
        the_plan = plan(req.body, tenant=req.tenant, route=req.route, directives=req.directives,
                        rules=policy.rules)
        if the_plan.bypass is not None:
            self._metrics.bypass(the_plan.bypass)
        if req.directives.no_cache and policy.cache.retry_feedback_s > 0:
            await self._retry_feedback(the_plan, policy.cache.retry_feedback_s)
        vector: Vector | None = None
        embed = True
        lease = True
        threshold = effective_threshold(_threshold(policy, the_plan, model, req.route), req.directives)
        if the_plan.lookup:
            found = await self._cache.lookup(the_plan, threshold, policy.guards)
            if isinstance(found, Hit):
                self._metrics.lookup(found.kind)
                if found.kind == "semantic":
                    self._metrics.similarity(found.score, True)
                    self._recent.remember(the_plan.key, found.entry.key, self._clock.monotonic())
                return self._replay(req, found)
            self._metrics.lookup("miss")
            if found.reason is not None:
                self._metrics.bypass(found.reason)
            if found.refused is not None:
                self._metrics.guard_refusal(found.refused)
            if found.best is not None:
                self._metrics.similarity(found.best, False)
            vector = found.vector
            # too long: nothing to embed; error: the embedder is likely backlogged, and adding
            # the store's embedding to its queue would make the overload worse
            embed = found.reason not in ("too_long", "error")
            lease = found.reason != "error"
        else:
            self._metrics.lookup("bypass")
        label = "miss" if the_plan.lookup else "bypass"
        # a request that asked for a fresh answer (no-cache) starts its own call
        target = (_Target(the_plan, vector, embed, threshold, join=the_plan.lookup,
                          coalesce=policy.cache.coalesce and the_plan.lookup,
                          lease=the_plan.lookup and lease)
                  if the_plan.store else None)
        return await self._forward(req, target, label)

    # -- feedback and explain (admin) -------------------------------------------------------

    async def _retry_feedback(self, the_plan: Plan, window_s: float) -> None:
        """A no-cache retry right after a semantic hit on the same request: that hit was wrong."""
        assert self._cache is not None
        served_by = self._recent.take(the_plan.key, self._clock.monotonic(), window_s)
        if served_by is not None:
            try:
                await self._cache.feedback(served_by, "retry")
            except Exception as exc:  # a store that is away must not fail the retry itself
                self._metrics.cache_error("feedback")
                log.warning("retry feedback failed: %s", type(exc).__name__)

    def plan_for(self, req: ApiRequest) -> tuple[Plan, float]:
        """The plan and threshold a request gets (for the admin calls; no directives)."""
        policy = self._policy()
        the_plan = plan(req.body, tenant=req.tenant, route=req.route, directives=Directives(),
                        rules=policy.rules)
        return the_plan, _threshold(policy, the_plan, str(req.body["model"]), req.route)

    async def explain(self, req: ApiRequest, k: int | None = None) -> Explanation | None:
        """What the cache would answer ``req`` with, and why; None when the cache is off."""
        if self._cache is None:
            return None
        the_plan, threshold = self.plan_for(req)
        return await self._cache.explain(the_plan, threshold, self._policy().guards, k)

    async def mark_wrong(self, req: ApiRequest | None = None, key: str | None = None) -> Entry | None:
        """Explicit feedback: evict the entry that served ``req`` (the one that served it by
        similarity lately, else the one that would serve it now), or the entry ``key``."""
        if self._cache is None:
            return None
        if key is not None:
            return await self._cache.feedback(key, "explicit")
        if req is None:
            return None
        the_plan, threshold = self.plan_for(req)
        served_by = self._recent.take(the_plan.key, self._clock.monotonic(), float("inf"))
        if served_by is not None:
            evicted = await self._cache.feedback(served_by, "explicit")
            if evicted is not None:
                return evicted
        found = await self._cache.explain(the_plan, threshold, self._policy().guards)
        return None if found.served_by is None else await self._cache.feedback(found.served_by, "explicit")

    # -- hits -------------------------------------------------------------------------------

    def _replay(self, req: ApiRequest, hit: Hit) -> Reply:
        response = self._fresh(req, hit.entry.response)
        headers = {"x-semcache": hit.kind}
        if hit.kind == "semantic":
            headers["x-semcache-similarity"] = f"{hit.score:.4f}"
        tokens = _usage_of(response)
        self._account(tokens, req, "cache")
        if not req.body.get("stream"):
            headers["content-type"] = JSON_TYPE
            return Reply(200, headers, body=orjson.dumps(response), result=hit.kind, tokens=tokens)
        headers.update(SSE_HEADERS)
        return Reply(200, headers, stream=self._replay_events(req, response, _wants_usage(req.body)),
                     result=hit.kind, tokens=tokens)

    async def _replay_events(self, req: ApiRequest, response: dict[str, Any],
                             include_usage: bool) -> AsyncGenerator[bytes, None]:
        to_chunks = (streaming.completion_to_chunks if req.route == "chat"
                     else streaming.text_completion_to_chunks)
        # the whole answer is known: one write instead of one per event
        events = [streaming.encode_event(orjson.dumps(chunk))
                  for chunk in to_chunks(response, include_usage=include_usage)]
        events.append(streaming.DONE)
        self._metrics.first_token("hit", self._clock.monotonic() - req.started)
        yield b"".join(events)

    # -- misses -----------------------------------------------------------------------------

    async def _forward(self, req: ApiRequest, target: _Target | None, label: str) -> Reply:
        """Join a flight already answering this question, or start one, and follow it."""
        if target is None and not req.body.get("stream"):
            return await self._forward_alone(req, label)
        flight = self._join(target)
        if flight is None and target is not None and target.join and self._cache is not None:
            # a slow lookup can miss a call that finished meanwhile: its answer is stored now
            late = await self._cache.recheck(target.plan, target.vector, target.threshold,
                                             self._policy().guards)
            if late is not None:
                return self._replay(req, late)
            # no await between this search and starting a flight: concurrent twins share one
            flight = self._join(target)
        if flight is not None:
            label = "coalesced"
        else:
            flight = self._start_flight(req, target)
        flight.subscribe()
        try:
            return await self._follow(req, flight, label)
        except BaseException:
            flight.unsubscribe()
            raise

    async def _forward_alone(self, req: ApiRequest, label: str) -> Reply:
        """A call nobody can share (cache off, no-store, n > 1 ...) and nobody streams: nothing
        outlives the request, so the call runs in the request's own task rather than a flight
        task that hands the answer over. A client that leaves cancels it, as with a flight."""
        flight = Flight(key="", scope=None, vector=None, streaming=False)
        try:
            await self._work(flight, req, None)
        except Exception as exc:   # as a flight task that crashed: logged, answered 502
            log.error("backend call for %s failed: %r",
                      self._route_backend(str(req.body["model"])).name, exc)
        flight.abandon()
        flight.subscribe()
        return await self._follow(req, flight, label)

    def _join(self, target: _Target | None) -> Flight | None:
        """The in-flight call this miss may share: same exact key, or a similar question."""
        if target is None or not target.join:
            return None
        flight = self._flights.find(target.plan.key)
        if flight is not None:
            self._metrics.coalesced("exact")
            return flight
        if target.vector is not None and target.coalesce:
            found = self._flights.find_similar(target.plan.scope, target.vector, target.threshold)
            if found is not None and not self._guarded(target, *found):
                self._metrics.coalesced("semantic")
                return found[0]
        return None

    def _guarded(self, target: _Target, flight: Flight, score: float) -> bool:
        if target.plan.text is None or flight.text is None:
            return True
        guard = check(target.plan.text, flight.text, self._policy().guards, score, target.plan.embedder)
        if guard is not None:
            self._metrics.guard_refusal(guard)
        return guard is not None

    def _start_flight(self, req: ApiRequest, target: _Target | None) -> Flight:
        stream = bool(req.body.get("stream"))
        key = target.plan.key if target is not None else secrets.token_hex(16)
        flight = Flight(key=key, scope=target.plan.scope if target else None,
                        vector=target.vector if target else None, streaming=stream,
                        text=target.plan.text if target else None)
        return self._flights.start(flight, self._work(flight, req, target), shared=target is not None)

    def _work(self, flight: Flight, req: ApiRequest, target: _Target | None) -> Coroutine[Any, Any, None]:
        """The backend call that answers ``flight``, measured by the energy meter when there is one."""
        backend = self._route_backend(str(req.body["model"]))
        work = self._fly(flight, req, backend, target)
        return work if self._energy is None else self._energy.track(backend.name, work)

    async def _follow(self, req: ApiRequest, flight: Flight, label: str) -> Reply:
        """Turn the flight into this request's reply; the caller unsubscribes on failure, the
        reply (or its stream) unsubscribes once delivered."""
        wants_stream = bool(req.body.get("stream"))
        follower = label == "coalesced"
        if wants_stream and flight.streaming:
            status, headers = await flight.wait_head()
            if status == 200:
                out = {**headers, **SSE_HEADERS, "x-semcache": label}
                return Reply(200, out, result=label,
                             stream=self._stream_flight(req, flight, _wants_usage(req.body), label))
        outcome = await flight.wait_outcome()
        flight.unsubscribe()
        if outcome.error is not None:
            raise outcome.error
        headers = {**outcome.headers, "x-semcache": label}
        if outcome.answer is None or outcome.status != 200:
            return Reply(outcome.status, headers, body=outcome.body, result="error")
        tokens = _usage_of(outcome.answer)
        if follower:
            self._account(tokens, req, "coalesced")
        if wants_stream:
            answer = self._fresh(req, outcome.answer)
            return Reply(200, {**headers, **SSE_HEADERS}, result=label, tokens=tokens,
                         stream=self._replay_events(req, answer, _wants_usage(req.body)))
        headers["content-type"] = JSON_TYPE
        # the first subscriber gets the upstream's bytes as they were; followers a fresh id
        body = (outcome.body if outcome.body and not follower
                else orjson.dumps(self._fresh(req, outcome.answer)))
        return Reply(200, headers, body=body, result=label, tokens=tokens)

    def _fresh(self, req: ApiRequest, answer: Mapping[str, Any]) -> dict[str, Any]:
        fresh = dict(answer)
        fresh["id"] = ("chatcmpl-" if req.route == "chat" else "cmpl-") + secrets.token_hex(12)
        fresh["created"] = int(self._clock.time())
        return fresh

    async def _stream_flight(self, req: ApiRequest, flight: Flight, include_usage: bool,
                             label: str) -> AsyncGenerator[bytes, None]:
        first = True
        try:
            async for events in flight.follow():
                data = b"".join(e.raw for e in events if include_usage or not e.usage_only)
                if not data:
                    continue
                if first:
                    self._metrics.first_token("miss", self._clock.monotonic() - req.started)
                    first = False
                yield data
            outcome = flight.outcome
            if label == "coalesced" and outcome is not None and outcome.answer is not None:
                self._account(_usage_of(outcome.answer), req, "coalesced")
        finally:
            flight.unsubscribe()

    async def _fly(self, flight: Flight, req: ApiRequest, backend: Backend, target: _Target | None) -> None:
        """The backend call, owned by no client. With leases (replicas sharing a store) only the
        replica holding the key's lease calls; the others take the answer it stores."""
        if target is None or not target.lease or self._leases is None or self._cache is None:
            # no-cache requests want their own answer; a lookup that could not reach the store
            # says the store is away, so waiting on it would only add its time budget
            await self._call_backend(flight, req, backend, target)
            return
        held, entry = await self._lease(target.plan)
        if entry is not None:
            self._metrics.coalesced("replica")
            self._finish_from(flight, req, entry.response)
            return
        try:
            await self._call_backend(flight, req, backend, target)
        finally:
            if held:
                await self._leases.release(target.plan.key)

    async def _lease(self, the_plan: Plan) -> tuple[bool, Entry | None]:
        """(True, None): this replica holds the lease (or there are no leases now), call the
        backend. (False, entry): another replica stored the answer meanwhile. (False, None): it
        took longer than lease_wait_s, call the backend anyway. A holder that dies stops renewing
        its lease, so the lease expires and this replica takes it over."""
        assert self._leases is not None and self._cache is not None
        deadline = self._clock.monotonic() + self._lease_wait_s
        while not await self._leases.acquire(the_plan.key):
            if self._clock.monotonic() >= deadline:
                return False, None
            await asyncio.sleep(self._lease_poll_s)
            entry = await self._cache.exact(the_plan)
            if entry is not None:
                return False, entry
        # stored just before this replica got the lease: no call needed either
        entry = await self._cache.exact(the_plan)
        if entry is not None:
            await self._leases.release(the_plan.key)
            return False, entry
        return True, None

    def _finish_from(self, flight: Flight, req: ApiRequest, response: Mapping[str, Any]) -> None:
        """Answer the flight with an answer another replica stored (replayed as events when
        the flight streams); every subscriber saved a backend call."""
        answer = self._fresh(req, response)
        if flight.streaming:
            flight.publish_head(200, {})
            to_chunks = (streaming.completion_to_chunks if req.route == "chat"
                         else streaming.text_completion_to_chunks)
            for chunk in to_chunks(answer, include_usage=True):
                usage_only = not chunk.get("choices") and bool(chunk.get("usage"))
                flight.publish(Event(streaming.encode_event(orjson.dumps(chunk)), usage_only=usage_only))
            flight.publish(Event(streaming.DONE))
        flight.finish(Outcome(200, {}, answer=answer))
        self._account(_usage_of(answer), req, "coalesced")

    async def _call_backend(self, flight: Flight, req: ApiRequest, backend: Backend,
                            target: _Target | None) -> None:
        """The backend call itself: publishes to the flight, then stores."""
        body = _ask_for_usage(req.body, req.raw) if flight.streaming else req.raw
        upstream = UpstreamRequest(method="POST", path=PATHS[req.route], query="",
                                   headers=req.headers, body=body, client_auth=req.upstream_auth,
                                   stream=flight.streaming)
        sent = self._clock.monotonic()
        try:
            resp = await backend.send(upstream)
        except ProxyError as exc:
            self._metrics.backend_error(backend.name, exc.label)
            flight.finish(Outcome(exc.status, {}, error=exc))
            return
        self._metrics.backend(backend.name, resp.status, self._clock.monotonic() - sent)
        headers = dict(resp.headers)
        if resp.chunks is None:
            answer = _parse_answer(resp) if resp.status == 200 else None
            flight.finish(Outcome(resp.status, headers, body=resp.body, answer=answer))
        else:
            flight.publish_head(resp.status, headers)
            answer = await self._relay(flight, req, resp, backend.name)
        if answer is None:
            return
        self._account(_usage_of(answer), req, "backend", backend.name)
        if target is not None and self._cache is not None:
            outcome = await self._cache.store(target.plan, model=str(req.body["model"]), route=req.route,
                                              response=answer, vector=target.vector, embed=target.embed)
            self._metrics.stored(outcome)

    async def _relay(self, flight: Flight, req: ApiRequest, resp: UpstreamResponse,
                     backend: str) -> dict[str, Any] | None:
        """Publish events as they arrive; the answer only if the stream ended cleanly."""
        parser = streaming.SSEParser()
        acc: streaming.ChatAccumulator | streaming.CompletionAccumulator = (
            streaming.ChatAccumulator() if req.route == "chat" else streaming.CompletionAccumulator())
        assert resp.chunks is not None
        failure: ProxyError | None = None
        try:
            async for data in resp.chunks:
                for event in parser.feed(data):
                    acc.add_event(event)
                    flight.publish(Event(event.raw, usage_only=_usage_only(event)))
            for event in parser.finish():
                acc.add_event(event)
        except ProxyError as exc:
            self._metrics.backend_error(backend, exc.label)
            failure = exc
        except streaming.SSEError as exc:
            self._metrics.backend_error(backend, "bad_stream")
            failure = BackendFailure(f"upstream stream is malformed: {exc}", code="bad_stream")
        finally:
            if resp.release is not None:
                resp.release()
        if failure is None and acc.error is not None:
            # the upstream's own error event was forwarded as it came
            failure = BackendFailure("upstream reported an error inside the stream", code="stream_error")
        elif failure is None and not acc.saw_done:
            self._metrics.backend_error(backend, "truncated")
            failure = BackendFailure("upstream stream ended before [DONE]", code="stream_truncated")
            flight.publish(Event(streaming.encode_error_event(failure.message, type=failure.type,
                                                              code=failure.code)))
        elif failure is not None:
            flight.publish(Event(streaming.encode_error_event(failure.message, type=failure.type,
                                                              code=failure.code)))
        if failure is not None:
            flight.finish(Outcome(502, dict(resp.headers), error=failure))
            return None
        answer = acc.result()
        flight.finish(Outcome(200, dict(resp.headers), answer=answer))
        return answer


def _threshold(policy: Policy, the_plan: Plan, model: str, route: str) -> float:
    """The embedding model's own threshold when it has one, else the model / route / global one."""
    own = policy.rules.threshold_for(the_plan)
    return own if own is not None else policy.cache.threshold_for(model, route)


def _parse_answer(resp: UpstreamResponse) -> dict[str, Any] | None:
    try:
        answer = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) else None


def _usage_of(answer: Mapping[str, Any]) -> Mapping[str, Any]:
    usage = answer.get("usage")
    return usage if isinstance(usage, Mapping) else {}


def _wants_usage(body: Mapping[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _ask_for_usage(body: Mapping[str, Any], raw: bytes) -> bytes:
    """Streamed answers are stored with their usage, so the upstream is always asked for it;
    subscribers that did not ask never see the usage-only event."""
    if _wants_usage(body):
        return raw
    patched = dict(body)
    patched["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return canonical_json(patched)


def _usage_only(event: streaming.SSEEvent) -> bool:
    if not event.data.startswith("{") or '"usage"' not in event.data:
        return False
    try:
        obj = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and bool(obj.get("usage"))
