"""End to end with the official openai SDK: sync, async and streaming, through a real proxy with
the real packaged model and FAISS, in front of a fake upstream."""

from __future__ import annotations

import uuid

import openai
import pytest

from bench.fake_upstream import FakeUpstream


def client(url: str, key: str = "sk-test-client") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def fresh(question: str) -> str:
    """A question no other test has asked (the fake upstream is shared by the session)."""
    return f"{question} [{uuid.uuid4().hex[:8]}]"


def ask(c: openai.OpenAI, question: str, **kwargs: object) -> tuple[str, str, str | None]:
    raw = c.chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=[{"role": "user", "content": question}], **kwargs)  # type: ignore[arg-type]
    completion = raw.parse()
    return (completion.choices[0].message.content or "", raw.headers.get("x-semcache", ""),
            raw.headers.get("x-semcache-similarity"))


def test_sync_miss_then_exact_hit(proxy: str, upstream: tuple[FakeUpstream, str]) -> None:
    fake, _ = upstream
    c = client(proxy)
    question = fresh("What is the boiling point of water at sea level?")
    before = fake.calls
    text1, state1, _ = ask(c, question)
    text2, state2, _ = ask(c, question)
    assert state1 == "miss" and state2 == "exact"
    assert text1 == text2 and question in text1
    assert fake.calls == before + 1


def test_semantic_hit_on_paraphrase_and_miss_on_other_question(proxy: str) -> None:
    c = client(proxy)
    tag = uuid.uuid4().hex[:6]
    # the same tag in both keeps the pair unique to this test and identical in that respect
    original, _, _ = ask(c, f"How do I reverse a list in Python? ({tag})")
    text, state, score = ask(c, f"How can I reverse a list in Python? ({tag})")
    assert state == "semantic", state
    assert score is not None and float(score) >= 0.9
    assert text == original
    _, other_state, _ = ask(c, f"What is the tallest mountain in Africa? ({tag})")
    assert other_state == "miss"


@pytest.mark.parametrize("include_usage", [False, True])
def test_streaming_miss_then_streamed_hit(proxy: str, include_usage: bool) -> None:
    c = client(proxy)
    question = fresh("Explain what a hash map is in one paragraph.")
    options = {"include_usage": True} if include_usage else None

    def stream_once() -> tuple[str, str | None, object]:
        stream = c.chat.completions.create(model="deepseek-chat", stream=True, stream_options=options,
                                           messages=[{"role": "user", "content": question}])
        parts, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(parts), finish, usage

    first, finish1, usage1 = stream_once()
    second, finish2, usage2 = stream_once()
    assert first == second and question in first
    assert finish1 == finish2 == "stop"
    if include_usage:
        assert usage1 is not None and usage2 is not None
        assert usage1.completion_tokens == usage2.completion_tokens  # type: ignore[attr-defined]
    else:
        assert usage1 is None and usage2 is None
    raw = c.chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=[{"role": "user", "content": question}])
    assert raw.headers["x-semcache"] == "exact"
    assert raw.parse().choices[0].message.content == first


async def test_async_client_and_reasoning_content_survive_replay(proxy: str) -> None:
    c = openai.AsyncOpenAI(base_url=proxy + "/v1", api_key="sk-async", max_retries=0)
    question = fresh("Why is the sky blue?")
    first = await c.chat.completions.create(model="deepseek-reasoner",
                                            messages=[{"role": "user", "content": question}])
    raw = await c.chat.completions.with_raw_response.create(
        model="deepseek-reasoner", messages=[{"role": "user", "content": question}])
    second = raw.parse()
    assert raw.headers["x-semcache"] == "exact"
    reasoning1 = first.choices[0].message.model_extra["reasoning_content"]  # type: ignore[index]
    reasoning2 = second.choices[0].message.model_extra["reasoning_content"]  # type: ignore[index]
    assert reasoning1 == reasoning2 and reasoning1.startswith("Thinking about")
    assert second.id != first.id
    assert second.usage is not None and second.usage.model_extra is not None
    assert second.usage.model_extra["prompt_cache_miss_tokens"] == first.usage.model_extra[  # type: ignore[union-attr]
        "prompt_cache_miss_tokens"]

    stream = await c.chat.completions.create(model="deepseek-reasoner", stream=True,
                                             messages=[{"role": "user", "content": question}])
    reasoning, content = [], []
    async for chunk in stream:
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            reasoning.append(extra.get("reasoning_content") or "")
            content.append(choice.delta.content or "")
    assert "".join(reasoning) == reasoning1
    assert "".join(content) == first.choices[0].message.content
    await c.close()


def test_legacy_completions_and_models(proxy: str) -> None:
    c = client(proxy)
    prompt = fresh("Once upon a time")
    first = c.completions.with_raw_response.create(model="deepseek-chat", prompt=prompt, max_tokens=16)
    second = c.completions.with_raw_response.create(model="deepseek-chat", prompt=prompt, max_tokens=16)
    assert first.headers["x-semcache"] == "miss" and second.headers["x-semcache"] == "exact"
    assert first.parse().choices[0].text == second.parse().choices[0].text
    models = c.models.list()
    assert {m.id for m in models.data} >= {"deepseek-chat", "deepseek-reasoner"}


def test_upstream_errors_pass_through(proxy: str) -> None:
    c = client(proxy)
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="deepseek-chat",
                                  messages=[{"role": "user", "content": fresh("FAULT:429")}])
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.body["message"] == "slow down"  # type: ignore[index]
    with pytest.raises(openai.InternalServerError):
        c.chat.completions.create(model="deepseek-chat",
                                  messages=[{"role": "user", "content": fresh("FAULT:500")}])
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="deepseek-chat",
                                  messages=[{"role": "user", "content": fresh("FAULT:401")}])


def test_broken_stream_raises_in_client_and_is_not_cached(
        proxy: str, upstream: tuple[FakeUpstream, str]) -> None:
    fake, _ = upstream
    c = client(proxy)
    for fault in ("break", "nodone", "error_event"):
        question = fresh(f"Tell me a story FAULT:{fault}")
        for _ in range(2):  # the second attempt must reach the upstream again: nothing was cached
            before = fake.calls
            with pytest.raises(openai.APIError):
                stream = c.chat.completions.create(model="deepseek-chat", stream=True,
                                                   messages=[{"role": "user", "content": question}])
                for _chunk in stream:
                    pass
            assert fake.calls == before + 1, fault
