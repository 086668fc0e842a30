"""The asyncio shell around batching.py: a ``Backend`` that queues calls for another backend.

``send()`` enqueues the request and waits for its batch. The pure ``BatchQueue`` decides when a
batch flushes and when to wake up; this shell keeps the one timer it asks for, runs the calls
under the backend's concurrency cap and hands every waiter its own answer:

- a multi-prompt backend (vLLM, llama.cpp's server) gets compatible non-streaming
  ``/v1/completions`` requests with a string prompt as ONE call with ``prompt: [...]``; the
  answer is split back by ``choices[].index`` (batching.split_answer). A merged call refused with
  400/413/422 (one bad prompt spoils the list) is retried request by request, so the others do
  not pay for it. Streams and chat requests go through on their own, at once.
- a chat-only backend gets a flushed batch fanned out concurrently under the cap.

Cancellation is deliberate: a waiter that leaves before its call starts is dropped from the
batch; a call whose waiters have all left is cancelled; a result is never set on a waiter that
left (a stream handed to nobody is released at once). A stream keeps its slot until it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .batching import (
    BatchPolicy,
    BatchQueue,
    Decision,
    Flush,
    Mergeable,
    Reject,
    WakeAt,
    fanout_group,
    mergeable,
    merged_body,
    split_answer,
)
from .errors import BackendFailure, Overloaded, ProxyError
from .ports import Backend, Metrics, UpstreamRequest, UpstreamResponse

log = logging.getLogger(__name__)

#: a merged call refused with one of these is retried one request at a time
SPLIT_ON = frozenset({400, 413, 422})


@dataclass(eq=False, slots=True)
class _Waiter:
    request: UpstreamRequest
    merge: Mergeable | None
    future: asyncio.Future[UpstreamResponse]
    gone: bool = False                       # the caller stopped waiting
    call: asyncio.Task[None] | None = None   # the call that will answer it, once flushed
    peers: tuple[_Waiter, ...] = ()          # every waiter that call serves (itself included)

    @property
    def live(self) -> bool:
        return not self.gone and not self.future.done()


@dataclass(eq=False, slots=True)
class _Call:
    peers: tuple[_Waiter, ...]
    owed: int


class Batcher:
    def __init__(self, inner: Backend, *, policy: BatchPolicy, multi_prompt: bool,
                 max_concurrency: int, metrics: Metrics) -> None:
        self._inner = inner
        self._queue: BatchQueue[_Waiter] = BatchQueue(policy)
        self._multi_prompt = multi_prompt
        # without a window nothing waits, so there is never anything to merge with
        self._merging = multi_prompt and policy.max_wait_s > 0 and policy.max_batch > 1
        self._slots = asyncio.Semaphore(max_concurrency)
        self._metrics = metrics
        self._timer: asyncio.TimerHandle | None = None
        # running call tasks: the waiters each serves, and how many of them still count in
        # the queue's depth (until the call holds a slot)
        self._calls: dict[asyncio.Task[Any], _Call] = {}
        # callers' tasks running their call themselves (_send_now), for close() to stop
        self._callers: set[asyncio.Task[Any]] = set()
        self._closed = False

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def inner(self) -> Backend:
        return self._inner

    @property
    def depth(self) -> int:
        return self._queue.depth

    async def start(self) -> None:
        self._closed = False
        await self._inner.start()

    async def close(self) -> None:
        self._closed = True
        self._disarm()
        self._fail(self._queue.drain(), BackendFailure(f"backend {self.name} is shutting down"))
        calls = list(self._calls)
        for task in calls:
            task.cancel()
        for caller in self._callers:
            caller.cancel()   # _send_now turns this into BackendFailure for its caller
        await asyncio.gather(*calls, return_exceptions=True)
        self._report_depth()
        await self._inner.close()

    async def health(self, timeout_s: float) -> bool:
        """The wrapped backend's own health probe; True when it has none."""
        probe = getattr(self._inner, "health", None)
        return True if probe is None else bool(await probe(timeout_s))

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        if self._closed:
            raise BackendFailure(f"backend {self.name} is shutting down")
        loop = asyncio.get_running_loop()
        merge = (mergeable(request.method, request.path, request.body, request.client_auth,
                           request.headers) if self._merging else None)
        group = merge.key if merge is not None else (
            None if self._multi_prompt else fanout_group(request.method, request.path))
        waiter = _Waiter(request, merge, loop.create_future())
        decisions = self._queue.arrive(loop.time(), waiter, group)
        for decision in decisions:
            if isinstance(decision, Reject):
                self._metrics.backend_error(self.name, "queue_full")
                raise Overloaded(f"Backend {self.name} has {self._queue.depth} requests queued; "
                                 "try again shortly.", code="queue_full",
                                 retry_after=decision.retry_after_s)
        if (len(decisions) == 1 and isinstance(decisions[0], Flush)
                and decisions[0].items == (waiter,) and not self._slots.locked()):
            return await self._send_now(waiter)
        self._apply(decisions)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._left(waiter)
            raise

    # -- carrying out decisions -------------------------------------------------------------

    def _apply(self, decisions: Sequence[Decision[_Waiter]]) -> None:
        for decision in decisions:
            if isinstance(decision, Flush):
                self._dispatch(decision)
            elif isinstance(decision, WakeAt):
                self._arm(decision.at)
        if self._queue.waiting == 0:
            self._disarm()
        self._report_depth()

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            if self._timer.when() == at:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._apply(self._queue.tick(asyncio.get_running_loop().time()))

    def _dispatch(self, flush: Flush[_Waiter]) -> None:
        items = flush.items
        self._metrics.batch(self.name, len(items), flush.waited_s)
        if len(items) > 1 and items[0].merge is not None:
            self._spawn(self._run_merged(items), items)
        else:
            for waiter in items:
                self._spawn(self._run_one(waiter), (waiter,))

    def _spawn(self, work: Coroutine[Any, Any, None], peers: tuple[_Waiter, ...]) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"batch:{self.name}")
        self._calls[task] = _Call(peers, owed=len(peers))
        task.add_done_callback(self._call_done)
        for waiter in peers:
            waiter.call = task
            waiter.peers = peers

    def _settle(self, task: asyncio.Task[Any]) -> None:
        """The task's items leave the queue's depth count: once it holds a slot, or when it
        ends (also when it was cancelled before it ever ran)."""
        call = self._calls.get(task)
        if call is not None and call.owed:
            owed, call.owed = call.owed, 0
            self._queue.dispatched(owed)
            self._report_depth()

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._settle(task)
        call = self._calls.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("batch call for %s failed: %r", self.name, task.exception())
        if call is not None:
            # cancelled (shutting down) or crashed before answering: nobody may wait forever
            self._fail(call.peers, BackendFailure(f"backend {self.name} call was abandoned"))

    def _left(self, waiter: _Waiter) -> None:
        waiter.gone = True
        if self._queue.leave(waiter):
            # still in its window: the batch goes without it
            if self._queue.waiting == 0:
                self._disarm()
            self._report_depth()
            return
        if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            # the answer came just as the caller left
            _discard(waiter.future.result())
        call = waiter.call
        if call is not None and not call.done() and all(peer.gone for peer in waiter.peers):
            call.cancel()  # nobody is left to read the answer: stop paying for it

    def _report_depth(self) -> None:
        self._metrics.queue_depth(self.name, self._queue.depth)

    # -- the calls ------------------------------------------------------------------------------

    async def _acquire(self) -> None:
        await self._slots.acquire()
        task = asyncio.current_task()
        if task is not None:
            self._settle(task)

    async def _run_one(self, waiter: _Waiter) -> None:
        await self._acquire()
        await self._send_holding(waiter)

    async def _send_alone(self, waiter: _Waiter) -> None:
        await self._slots.acquire()
        await self._send_holding(waiter)

    async def _send_holding(self, waiter: _Waiter) -> None:
        """Send one request with a slot held, and hand its answer (or failure) to the waiter."""
        if not waiter.live:
            self._slots.release()
            return
        try:
            resp = await self._call_holding(waiter.request)
        except Exception as exc:
            self._fail((waiter,), exc)
            return
        self._deliver(waiter, resp)

    async def _call_holding(self, request: UpstreamRequest) -> UpstreamResponse:
        """The call, with a slot already held; the slot is freed when the answer is complete
        (a stream's when it ends or is released), or when the call fails or is cancelled."""
        passed = False
        try:
            resp = await self._inner.send(request)
            if resp.chunks is not None:
                resp, passed = self._stream_holding_slot(resp), True
            return resp
        finally:
            if not passed:
                self._slots.release()

    async def _send_now(self, waiter: _Waiter) -> UpstreamResponse:
        """A request flushed alone at once, with a slot free (the usual case without a window):
        the call runs in the caller's own task instead of a call task that hands its answer over,
        with the same slot, depth and metrics. Cancelling the caller cancels the call."""
        self._metrics.batch(self.name, 1, 0.0)
        await self._slots.acquire()   # a slot is free: this returns without suspending
        self._queue.dispatched(1)
        self._report_depth()
        caller = asyncio.current_task()
        assert caller is not None
        self._callers.add(caller)
        try:
            return await self._call_holding(waiter.request)
        except asyncio.CancelledError:
            # close() cancelled the call, not the caller's own cancellation: fail it as a
            # call task's waiter would be failed
            if self._closed and caller.uncancel() == 0:
                raise BackendFailure(f"backend {self.name} is shutting down") from None
            raise
        except Exception as exc:
            raise self._proxy_error(exc) from None
        finally:
            self._callers.discard(caller)

    async def _run_merged(self, items: tuple[_Waiter, ...]) -> None:
        await self._acquire()
        live = [waiter for waiter in items if waiter.live]
        if len(live) <= 1:
            # the others left before the call: no list needed
            if live:
                await self._send_holding(live[0])
            else:
                self._slots.release()
            return
        held = True
        try:
            prompts = [waiter.merge.prompt for waiter in live if waiter.merge is not None]
            resp = await self._inner.send(self._merged_request(live, prompts))
            if resp.status in SPLIT_ON:
                # one prompt may have spoilt the list: let each request stand on its own
                self._slots.release()
                held = False
                await asyncio.gather(*(self._send_alone(waiter) for waiter in live if waiter.live))
                return
            self._deliver_split(live, prompts, resp)
        except Exception as exc:
            self._fail(live, exc)
        finally:
            if held:
                self._slots.release()

    @staticmethod
    def _merged_request(live: Sequence[_Waiter], prompts: Sequence[str]) -> UpstreamRequest:
        first = live[0]
        assert first.merge is not None
        return UpstreamRequest(method=first.request.method, path=first.request.path,
                               query=first.request.query, headers=first.request.headers,
                               body=merged_body(first.merge.params, prompts),
                               client_auth=first.request.client_auth, stream=False)

    def _deliver_split(self, live: Sequence[_Waiter], prompts: Sequence[str],
                       resp: UpstreamResponse) -> None:
        headers = dict(resp.headers)
        if resp.status != 200:
            # the backend's own error (429, 5xx, ...) is every waiter's answer
            for waiter in live:
                self._deliver(waiter, UpstreamResponse(resp.status, headers, body=resp.body))
            return
        try:
            answer = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            self._fail(live, BackendFailure(f"backend {self.name} sent a batched answer that is not "
                                            "a JSON object", code="bad_batch_answer"))
            return
        for waiter, one in zip(live, split_answer(answer, prompts), strict=True):
            if one is None:
                self._fail((waiter,), BackendFailure(
                    f"backend {self.name}'s batched answer has no choice for this prompt",
                    code="bad_batch_answer"))
            else:
                self._deliver(waiter, UpstreamResponse(200, headers, body=orjson.dumps(one)))

    def _stream_holding_slot(self, resp: UpstreamResponse) -> UpstreamResponse:
        source, close_source = resp.chunks, resp.release
        assert source is not None
        freed = False

        def free() -> None:
            nonlocal freed
            if not freed:
                freed = True
                self._slots.release()

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for data in source:
                    yield data
            finally:
                free()
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()

        def release() -> None:
            free()
            if close_source is not None:
                close_source()

        return UpstreamResponse(resp.status, resp.headers, chunks=chunks(), release=release)

    # -- handing answers over -----------------------------------------------------------------

    def _deliver(self, waiter: _Waiter, resp: UpstreamResponse) -> None:
        if waiter.live:
            waiter.future.set_result(resp)
        else:
            _discard(resp)  # its caller left: nobody will read or release this answer

    def _fail(self, waiters: Sequence[_Waiter], exc: Exception) -> None:
        error = self._proxy_error(exc)
        for waiter in waiters:
            if waiter.live:
                waiter.future.set_exception(error)

    def _proxy_error(self, exc: Exception) -> ProxyError:
        if isinstance(exc, ProxyError):
            return exc
        log.error("batch call for %s failed unexpectedly", self.name, exc_info=exc)
        return BackendFailure(f"backend {self.name} call failed ({type(exc).__name__})")


def _discard(resp: UpstreamResponse) -> None:
    if resp.release is not None:
        resp.release()
