"""The Batcher (asyncio shell around batching.py): merging for multi-prompt backends, fan-out
under a concurrency cap, the bounded queue, cancellation; then through the real proxy to the
fake upstream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry

from bench.fake_upstream import FakeUpstream
from proxy.batcher import Batcher
from proxy.batching import BatchPolicy
from proxy.errors import BackendFailure, Overloaded
from proxy.metrics import PrometheusMetrics
from proxy.ports import UpstreamRequest, UpstreamResponse
from tests.conftest import ProxyFactory

JSON = {"content-type": "application/json"}


class ScriptedBackend:
    """An in-process backend that answers completions (a list of prompts too) after a delay,
    and records what it was asked, how many calls ran at once and which were cancelled."""

    name = "local"

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.calls: list[dict[str, Any]] = []
        self.active = 0
        self.peak = 0
        self.cancelled = 0
        self.list_status: int | None = None    # answer a list of prompts with this status
        self.tasks: list[asyncio.Task[Any] | None] = []   # the task each call ran in

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def send(self, request: UpstreamRequest) -> UpstreamResponse:
        body = orjson.loads(request.body)
        self.calls.append(body)
        self.tasks.append(asyncio.current_task())
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        prompt = body.get("prompt")
        if isinstance(prompt, list) and self.list_status is not None:
            return UpstreamResponse(self.list_status, JSON, body=b'{"error": {"message": "no"}}')
        if isinstance(prompt, str) and "BAD" in prompt:
            return UpstreamResponse(400, JSON, body=b'{"error": {"message": "bad prompt"}}')
        if request.stream:
            return self._stream()
        prompts = prompt if isinstance(prompt, list) else [prompt]
        choices = [{"index": i, "text": f"re: {p}", "finish_reason": "stop", "logprobs": None}
                   for i, p in enumerate(prompts)]
        usage = {"prompt_tokens": 4 * len(prompts), "completion_tokens": 8 * len(prompts),
                 "total_tokens": 12 * len(prompts)}
        return UpstreamResponse(200, JSON, body=orjson.dumps({
            "id": "cmpl-x", "object": "text_completion", "created": 1, "model": body.get("model"),
            "choices": choices, "usage": usage}))

    def _stream(self) -> UpstreamResponse:
        closed: list[bool] = []

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                await asyncio.sleep(0.01)
                yield f"data: {i}\n\n".encode()

        return UpstreamResponse(200, {"content-type": "text/event-stream"}, chunks=chunks(),
                                release=lambda: closed.append(True))


def completion(prompt: str, **params: Any) -> UpstreamRequest:
    body = {"model": "m", "max_tokens": 8, "temperature": 0, "prompt": prompt, **params}
    return UpstreamRequest(method="POST", path="/v1/completions", query="", headers=JSON,
                           body=orjson.dumps(body), stream=bool(params.get("stream")))


def chat(text: str, stream: bool = False) -> UpstreamRequest:
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": text}],
            "stream": stream}
    return UpstreamRequest(method="POST", path="/v1/chat/completions", query="", headers=JSON,
                           body=orjson.dumps(body), stream=stream)


class Rig:
    def __init__(self, *, multi_prompt: bool = True, max_concurrency: int = 8, delay_s: float = 0.05,
                 **policy: Any) -> None:
        self.backend = ScriptedBackend(delay_s)
        self.registry = CollectorRegistry()
        self.metrics = PrometheusMetrics(self.registry, backends=("local",))
        self.batcher = Batcher(self.backend, policy=BatchPolicy(**policy), multi_prompt=multi_prompt,
                               max_concurrency=max_concurrency, metrics=self.metrics)

    def sample(self, name: str) -> float:
        value = self.registry.get_sample_value(name, {"backend": "local"})
        return 0.0 if value is None else value


def text_of(resp: UpstreamResponse) -> str:
    answer = orjson.loads(resp.body)
    assert answer["object"] == "text_completion" and len(answer["choices"]) == 1
    assert answer["choices"][0]["index"] == 0
    return str(answer["choices"][0]["text"])


async def test_compatible_completions_merge_into_one_call() -> None:
    rig = Rig(max_wait_s=0.05, max_batch=16)
    prompts = [f"question {i}" for i in range(4)]
    answers = await asyncio.gather(*(rig.batcher.send(completion(p)) for p in prompts))
    assert len(rig.backend.calls) == 1 and rig.backend.calls[0]["prompt"] == prompts
    assert [text_of(a) for a in answers] == [f"re: {p}" for p in prompts]
    usage = [orjson.loads(a.body)["usage"] for a in answers]
    assert sum(u["total_tokens"] for u in usage) == 48
    assert rig.sample("semcache_batch_size_count") == 1 and rig.sample("semcache_batch_size_sum") == 4
    assert 0.04 <= rig.sample("semcache_batch_wait_seconds_sum") <= 0.5
    assert rig.sample("semcache_queue_depth") == 0


async def test_different_parameters_never_share_a_call() -> None:
    rig = Rig(max_wait_s=0.03)
    answers = await asyncio.gather(rig.batcher.send(completion("a")), rig.batcher.send(completion("b")),
                                   rig.batcher.send(completion("c", max_tokens=9)))
    assert sorted(len(c["prompt"]) if isinstance(c["prompt"], list) else 1
                  for c in rig.backend.calls) == [1, 2]
    assert [text_of(a) for a in answers] == ["re: a", "re: b", "re: c"]


async def test_max_batch_flushes_before_the_window() -> None:
    rig = Rig(max_wait_s=10.0, max_batch=2)
    async with asyncio.timeout(2):
        answers = await asyncio.gather(*(rig.batcher.send(completion(f"p{i}")) for i in range(4)))
    assert [len(c["prompt"]) for c in rig.backend.calls] == [2, 2]
    assert [text_of(a) for a in answers] == [f"re: p{i}" for i in range(4)]


async def test_streams_and_chat_to_a_multi_prompt_backend_go_alone_and_at_once() -> None:
    rig = Rig(max_wait_s=10.0)
    async with asyncio.timeout(2):
        streamed = await rig.batcher.send(completion("s", stream=True))
        assert streamed.chunks is not None
        assert [c async for c in streamed.chunks] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
        await rig.batcher.send(chat("hello"))
    assert len(rig.backend.calls) == 2


async def test_a_full_queue_sheds_load_with_503_and_retry_after() -> None:
    rig = Rig(max_wait_s=0.2, max_queue=2, retry_after_s=2.0)
    first = [asyncio.create_task(rig.batcher.send(completion(f"q{i}"))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        await rig.batcher.send(completion("one too many"))
    assert refused.value.status == 503 and refused.value.headers() == {"Retry-After": "2"}
    assert [text_of(a) for a in await asyncio.gather(*first)] == ["re: q0", "re: q1"]
    await rig.batcher.send(completion("room again"))


async def test_requests_waiting_for_a_slot_count_against_the_queue() -> None:
    rig = Rig(multi_prompt=False, max_concurrency=1, max_queue=2, delay_s=0.2)
    busy = [asyncio.create_task(rig.batcher.send(chat(f"c{i}"))) for i in range(2)]
    await asyncio.sleep(0.05)   # one call runs, one waits for the slot
    assert rig.sample("semcache_queue_depth") == 1
    third = asyncio.create_task(rig.batcher.send(chat("c2")))
    await asyncio.sleep(0)
    assert not third.done()     # depth 1 < 2: admitted
    with pytest.raises(Overloaded):
        await rig.batcher.send(chat("c3"))
    await asyncio.gather(*busy, third)
    assert rig.sample("semcache_queue_depth") == 0


async def test_a_waiter_that_leaves_its_window_is_dropped_from_the_batch() -> None:
    rig = Rig(max_wait_s=0.1)
    tasks = [asyncio.create_task(rig.batcher.send(completion(f"w{i}"))) for i in range(3)]
    await asyncio.sleep(0.02)
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[1], asyncio.CancelledError)
    assert rig.backend.calls[0]["prompt"] == ["w0", "w2"]
    assert [text_of(d) for d in (done[0], done[2]) if isinstance(d, UpstreamResponse)] == ["re: w0", "re: w2"]


async def test_the_call_is_cancelled_when_every_waiter_leaves() -> None:
    rig = Rig(max_wait_s=0.01, delay_s=5.0)
    tasks = [asyncio.create_task(rig.batcher.send(completion(f"x{i}"))) for i in range(3)]
    await asyncio.sleep(0.1)    # the merged call is under way
    assert len(rig.backend.calls) == 1 and rig.backend.active == 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert rig.backend.cancelled == 1 and rig.backend.active == 0
    assert rig.sample("semcache_queue_depth") == 0


async def test_one_waiter_leaving_a_running_call_does_not_disturb_the_others() -> None:
    rig = Rig(max_wait_s=0.01, delay_s=0.2)
    tasks = [asyncio.create_task(rig.batcher.send(completion(f"y{i}"))) for i in range(3)]
    await asyncio.sleep(0.1)
    tasks[0].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert rig.backend.cancelled == 0
    assert [text_of(d) for d in done[1:] if isinstance(d, UpstreamResponse)] == ["re: y1", "re: y2"]


async def test_chat_batches_fan_out_under_the_concurrency_cap() -> None:
    rig = Rig(multi_prompt=False, max_concurrency=2, max_wait_s=0.02, delay_s=0.05)
    answers = await asyncio.gather(*(rig.batcher.send(chat(f"c{i}")) for i in range(6)))
    assert len(answers) == 6 and all(a.status == 200 for a in answers)
    assert len(rig.backend.calls) == 6 and rig.backend.peak == 2
    assert rig.sample("semcache_batch_size_sum") == 6
    assert rig.sample("semcache_queue_depth") == 0


async def test_a_stream_holds_its_slot_until_it_ends() -> None:
    rig = Rig(multi_prompt=False, max_concurrency=1, delay_s=0.0)
    stream = await rig.batcher.send(chat("long story", stream=True))
    second = asyncio.create_task(rig.batcher.send(chat("next")))
    await asyncio.sleep(0.05)
    assert not second.done()          # the stream still holds the only slot
    assert stream.chunks is not None
    _ = [c async for c in stream.chunks]
    assert (await asyncio.wait_for(second, 1)).status == 200


async def test_a_released_stream_frees_its_slot() -> None:
    rig = Rig(multi_prompt=False, max_concurrency=1, delay_s=0.0)
    stream = await rig.batcher.send(chat("abandoned", stream=True))
    assert stream.release is not None
    stream.release()
    stream.release()                  # idempotent: the slot is freed once
    assert (await asyncio.wait_for(rig.batcher.send(chat("next")), 1)).status == 200
    assert rig.batcher._slots._value == 1


async def test_a_merged_call_refused_with_400_is_retried_one_by_one() -> None:
    rig = Rig(max_wait_s=0.02)
    rig.backend.list_status = 400
    answers = await asyncio.gather(*(rig.batcher.send(completion(p)) for p in ("ok1", "BAD", "ok2")))
    assert [a.status for a in answers] == [200, 400, 200]
    assert [text_of(a) for a in (answers[0], answers[2])] == ["re: ok1", "re: ok2"]
    assert len(rig.backend.calls) == 4


async def test_a_backend_error_on_a_merged_call_reaches_every_waiter() -> None:
    rig = Rig(max_wait_s=0.02)
    rig.backend.list_status = 503
    answers = await asyncio.gather(*(rig.batcher.send(completion(f"e{i}")) for i in range(3)))
    assert [a.status for a in answers] == [503, 503, 503] and len(rig.backend.calls) == 1


async def test_close_fails_waiting_requests_and_refuses_new_ones() -> None:
    rig = Rig(max_wait_s=10.0)
    waiting = asyncio.create_task(rig.batcher.send(completion("never")))
    await asyncio.sleep(0.01)
    await rig.batcher.close()
    with pytest.raises(BackendFailure):
        await waiting
    with pytest.raises(BackendFailure):
        await rig.batcher.send(completion("after"))


async def test_close_fails_requests_whose_call_is_under_way() -> None:
    rig = Rig(max_wait_s=0.0, delay_s=5.0)
    running = asyncio.create_task(rig.batcher.send(completion("slow")))
    await asyncio.sleep(0.05)
    await rig.batcher.close()
    with pytest.raises(BackendFailure):
        await asyncio.wait_for(running, 1)
    assert rig.backend.cancelled == 1


async def test_without_a_window_a_free_slot_runs_the_call_in_the_callers_task() -> None:
    rig = Rig(max_wait_s=0.0, max_concurrency=1, delay_s=0.05)

    async def ask(prompt: str) -> tuple[asyncio.Task[Any] | None, str]:
        return asyncio.current_task(), text_of(await rig.batcher.send(completion(prompt)))

    first = asyncio.create_task(ask("one"))
    await asyncio.sleep(0.01)
    # the only slot is taken: this one waits for it in a call task of the batcher's own
    second = asyncio.create_task(ask("two"))
    (task_one, text_one), (_, text_two) = await asyncio.gather(first, second)
    assert (text_one, text_two) == ("re: one", "re: two")
    assert rig.backend.tasks[0] is task_one is first
    assert rig.backend.tasks[1] is not None and rig.backend.tasks[1] is not second
    assert rig.backend.peak == 1
    assert rig.sample("semcache_batch_size_count") == 2 and rig.sample("semcache_queue_depth") == 0
    # the slot came back both ways: a third request runs at once, in its own task again
    third = asyncio.create_task(ask("three"))
    assert (await third)[1] == "re: three" and rig.backend.tasks[2] is third


async def test_a_caller_cancelled_during_its_own_call_is_cancelled_and_frees_the_slot() -> None:
    rig = Rig(max_wait_s=0.0, max_concurrency=1, delay_s=5.0)
    running = asyncio.create_task(rig.batcher.send(completion("slow")))
    await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert rig.backend.cancelled == 1
    rig.backend.delay_s = 0.0
    assert text_of(await asyncio.wait_for(rig.batcher.send(completion("next")), 1)) == "re: next"


# -- through the real proxy, to the fake upstream ----------------------------------------------


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + "{") and 'backend="fake"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_proxy_merges_concurrent_completions_for_a_vllm_backend(
        make_proxy: ProxyFactory, upstream: tuple[FakeUpstream, str]) -> None:
    fake, upstream_url = upstream
    url = make_proxy(backends=[{"name": "fake", "type": "vllm", "base_url": upstream_url,
                                "api_key_env": None, "batch": {"max_wait_ms": 100}}])
    tag = uuid.uuid4().hex[:8]
    # distinct subjects: similar prompts could be coalesced by the cache before the batcher
    subjects = ("volcanoes erupting", "how bicycles balance", "a haiku about autumn", "uses of copper")
    prompts = [f"Tell me about {subject} ({tag})" for subject in subjects]
    before = fake.calls

    async def ask(session: aiohttp.ClientSession, prompt: str) -> tuple[str, str]:
        body = {"model": "deepseek-chat", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        async with session.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            answer = await resp.json()
            assert answer["object"] == "text_completion" and len(answer["choices"]) == 1
            return answer["choices"][0]["text"], resp.headers["x-semcache"]

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(ask(session, p) for p in prompts))
        for prompt, (text, state) in zip(prompts, results, strict=True):
            assert (text[:len(prompt) + 11], state) == (f"Answer to: {prompt}", "miss")
        assert fake.calls == before + 1
        assert sorted(fake.requests[-1]["prompt"]) == sorted(prompts)   # one call, a list of 4
        assert await metric(session, url, "semcache_batch_size_count") == 1
        assert await metric(session, url, "semcache_batch_size_sum") == 4
        # each split answer was stored on its own: asking again is an exact hit, no call
        text, state = await ask(session, prompts[2])
        assert state == "exact" and text.startswith(f"Answer to: {prompts[2]}")
        assert fake.calls == before + 1
