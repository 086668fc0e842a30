"""batching is pure: the batch state machine driven by a fake clock, and the merge/split helpers,
table-driven."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from proxy.batching import (
    BatchPolicy,
    BatchQueue,
    Decision,
    Flush,
    Reject,
    WakeAt,
    fanout_group,
    mergeable,
    merged_body,
    share_usage,
    split_answer,
)


@dataclass(frozen=True)
class Arrive:
    t: float
    item: str
    group: str | None = "g"


@dataclass(frozen=True)
class Tick:
    t: float


@dataclass(frozen=True)
class Leave:
    item: str
    found: bool = True


@dataclass(frozen=True)
class Dispatched:
    n: int


Event = Arrive | Tick | Leave | Dispatched
W = 0.010  # the window used by most cases

# (name, policy, [(event, decisions expected back, depth after)])
CASES: list[tuple[str, BatchPolicy, list[tuple[Event, list[Decision[str]], int]]]] = [
    ("a lone item waits for the window, then flushes at the deadline",
     BatchPolicy(max_batch=4, max_wait_s=W),
     [(Arrive(0.0, "a"), [WakeAt(W)], 1),
      (Tick(0.005), [WakeAt(W)], 1),
      (Tick(W), [Flush(("a",), W)], 1),
      (Dispatched(1), [], 0)]),
    ("max_batch flushes at once, before the deadline",
     BatchPolicy(max_batch=3, max_wait_s=W),
     [(Arrive(0.000, "a"), [WakeAt(W)], 1),
      (Arrive(0.001, "b"), [WakeAt(W)], 2),
      (Arrive(0.002, "c"), [Flush(("a", "b", "c"), 0.002)], 3),
      (Tick(W), [], 3),
      (Dispatched(3), [], 0)]),
    ("the deadline belongs to the first item of the batch, not the last",
     BatchPolicy(max_batch=8, max_wait_s=W),
     [(Arrive(0.000, "a"), [WakeAt(W)], 1),
      (Arrive(0.009, "b"), [WakeAt(W)], 2),
      (Tick(W), [Flush(("a", "b"), W)], 2)]),
    ("groups wait apart and flush on their own deadlines",
     BatchPolicy(max_batch=8, max_wait_s=W),
     [(Arrive(0.000, "a", "x"), [WakeAt(W)], 1),
      (Arrive(0.004, "b", "y"), [WakeAt(W)], 2),
      (Arrive(0.005, "c", "x"), [WakeAt(W)], 3),
      (Tick(W), [Flush(("a", "c"), W), WakeAt(0.014)], 3),
      (Tick(0.014), [Flush(("b",), 0.010)], 3)]),
    ("a full group flushes while another keeps waiting",
     BatchPolicy(max_batch=2, max_wait_s=W),
     [(Arrive(0.000, "a", "x"), [WakeAt(W)], 1),
      (Arrive(0.001, "b", "y"), [WakeAt(W)], 2),
      (Arrive(0.002, "c", "y"), [Flush(("b", "c"), 0.001), WakeAt(W)], 3)]),
    ("an item without a group goes at once",
     BatchPolicy(max_batch=8, max_wait_s=W),
     [(Arrive(0.000, "a"), [WakeAt(W)], 1),
      (Arrive(0.001, "s", None), [Flush(("s",), 0.0), WakeAt(W)], 2)]),
    ("a zero window sends every item at once",
     BatchPolicy(max_batch=8, max_wait_s=0.0),
     [(Arrive(0.0, "a"), [Flush(("a",), 0.0)], 1),
      (Arrive(0.0, "b"), [Flush(("b",), 0.0)], 2)]),
    ("max_batch 1 sends every item at once",
     BatchPolicy(max_batch=1, max_wait_s=W),
     [(Arrive(0.0, "a"), [Flush(("a",), 0.0)], 1)]),
    ("a full queue rejects, and admits again once items are dispatched",
     BatchPolicy(max_batch=8, max_wait_s=W, max_queue=2, retry_after_s=3.0),
     [(Arrive(0.000, "a"), [WakeAt(W)], 1),
      (Arrive(0.001, "b"), [WakeAt(W)], 2),
      (Arrive(0.002, "c"), [Reject("c", 3.0)], 2),
      (Tick(W), [Flush(("a", "b"), W)], 2),
      (Arrive(0.011, "d"), [Reject("d", 3.0)], 2),     # flushed, still waiting for a slot
      (Dispatched(2), [], 0),
      (Arrive(0.012, "e"), [WakeAt(0.022)], 1)]),
    ("items without a group count against the queue too",
     BatchPolicy(max_batch=8, max_wait_s=W, max_queue=1),
     [(Arrive(0.0, "s", None), [Flush(("s",), 0.0)], 1),
      (Arrive(0.0, "t", None), [Reject("t", 1.0)], 1)]),
    ("an item that leaves its window is not flushed",
     BatchPolicy(max_batch=8, max_wait_s=W),
     [(Arrive(0.000, "a"), [WakeAt(W)], 1),
      (Arrive(0.001, "b"), [WakeAt(W)], 2),
      (Leave("a"), [], 1),
      (Tick(W), [Flush(("b",), W)], 1)]),
    ("when the last item leaves, the group is gone and nothing flushes",
     BatchPolicy(max_batch=8, max_wait_s=W),
     [(Arrive(0.000, "a"), [WakeAt(W)], 1),
      (Leave("a"), [], 0),
      (Tick(W), [], 0),
      (Leave("a", found=False), [], 0)]),
    ("a flushed item cannot leave its window any more",
     BatchPolicy(max_batch=1, max_wait_s=W),
     [(Arrive(0.0, "a"), [Flush(("a",), 0.0)], 1),
      (Leave("a", found=False), [], 1)]),
    ("a late timer flushes everything that is due, oldest first",
     BatchPolicy(max_batch=8, max_wait_s=W),
     [(Arrive(0.000, "a", "x"), [WakeAt(W)], 1),
      (Arrive(0.002, "b", "y"), [WakeAt(W)], 2),
      (Tick(0.050), [Flush(("a",), 0.050), Flush(("b",), 0.048)], 2)]),
    ("a timer a hair early still counts as due",
     BatchPolicy(max_batch=8, max_wait_s=W),
     [(Arrive(0.0, "a"), [WakeAt(W)], 1),
      (Tick(W - 1e-6), [Flush(("a",), W - 1e-6)], 1)]),
]


def run_event(queue: BatchQueue[str], event: Event) -> list[Decision[str]]:
    if isinstance(event, Arrive):
        return queue.arrive(event.t, event.item, event.group)
    if isinstance(event, Tick):
        return queue.tick(event.t)
    if isinstance(event, Leave):
        assert queue.leave(event.item) is event.found
        return []
    queue.dispatched(event.n)
    return []


def approx(decisions: list[Decision[str]]) -> list[Any]:
    out: list[Any] = []
    for d in decisions:
        if isinstance(d, Flush):
            out.append(("flush", d.items, round(d.waited_s, 9)))
        elif isinstance(d, WakeAt):
            out.append(("wake", round(d.at, 9)))
        else:
            out.append(("reject", d.item, d.retry_after_s))
    return out


Steps = list[tuple[Event, list[Decision[str]], int]]


@pytest.mark.parametrize(("name", "policy", "steps"), CASES, ids=[c[0] for c in CASES])
def test_batch_queue(name: str, policy: BatchPolicy, steps: Steps) -> None:
    queue: BatchQueue[str] = BatchQueue(policy)
    for i, (event, expected, depth) in enumerate(steps):
        got = run_event(queue, event)
        assert approx(got) == approx(expected), f"step {i}: {event}"
        assert queue.depth == depth, f"step {i}: {event}"


def test_drain_takes_every_waiting_item() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch=8, max_wait_s=W))
    queue.arrive(0.0, "a", "x")
    queue.arrive(0.0, "b", "y")
    assert sorted(queue.drain()) == ["a", "b"]
    assert queue.depth == 0 and queue.tick(1.0) == []


def test_dispatching_more_than_flushed_is_a_bug() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy())
    with pytest.raises(ValueError):
        queue.dispatched(1)


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"max_queue": 0}, {"max_wait_s": -1.0},
                                 {"retry_after_s": 0.0}])
def test_policy_refuses_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**bad)


# -- merging ------------------------------------------------------------------------------------


def body(**fields: Any) -> bytes:
    return orjson.dumps({"model": "m", "max_tokens": 16, "temperature": 0, "prompt": "hi", **fields})


def key(raw: bytes, path: str = "/v1/completions", auth: str | None = None,
        headers: dict[str, str] | None = None) -> Any:
    found = mergeable("POST", path, raw, auth, headers or {})
    return None if found is None else found.key


MERGEABLE = {
    "plain": (body(), True),
    "stream false": (body(stream=False), True),
    "n 1": (body(n=1), True),
    "stream": (body(stream=True), False),
    "n 2": (body(n=2), False),
    "best_of 3": (body(best_of=3), False),
    "prompt list": (body(prompt=["a", "b"]), False),
    "token prompt": (body(prompt=[1, 2, 3]), False),
    "no prompt": (orjson.dumps({"model": "m"}), False),
    "not json": (b"{nope", False),
    "not an object": (b"[1]", False),
}


@pytest.mark.parametrize("name", sorted(MERGEABLE))
def test_which_requests_merge(name: str) -> None:
    raw, expected = MERGEABLE[name]
    assert (key(raw) is not None) is expected


def test_only_completions_posts_merge() -> None:
    assert key(body(), path="/v1/chat/completions") is None
    assert mergeable("GET", "/v1/completions", body(), None, {}) is None


@pytest.mark.parametrize("change", [{"model": "other"}, {"max_tokens": 17}, {"temperature": 0.5},
                                    {"stop": ["\n"]}, {"seed": 1}, {"echo": True}])
def test_every_parameter_but_the_prompt_separates_groups(change: dict[str, Any]) -> None:
    assert key(body(**change)) != key(body())
    assert key(body(prompt="another prompt")) == key(body())


def test_auth_and_organisation_separate_groups() -> None:
    assert key(body(), auth="Bearer a") != key(body(), auth="Bearer b")
    assert key(body(), headers={"openai-organization": "o1"}) != key(body())


def test_key_ignores_field_order() -> None:
    a = b'{"prompt": "x", "model": "m", "max_tokens": 4}'
    b = b'{"max_tokens": 4, "model": "m", "prompt": "y"}'
    assert key(a) == key(b)


def test_fanout_group() -> None:
    assert fanout_group("POST", "/v1/chat/completions") == fanout_group("POST", "/v1/completions")
    assert fanout_group("POST", "/v1/chat/completions") is not None
    assert fanout_group("GET", "/v1/models") is None


def test_merged_body_keeps_params_and_lists_prompts() -> None:
    found = mergeable("POST", "/v1/completions", body(), None, {})
    assert found is not None
    merged = orjson.loads(merged_body(found.params, ["a", "b"]))
    assert merged == {"model": "m", "max_tokens": 16, "temperature": 0, "prompt": ["a", "b"]}


# -- splitting ----------------------------------------------------------------------------------

PROMPTS = ["one", "three", "seven!"]


def answer(**extra: Any) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            # out of order on purpose: the split goes by index, not by position
            "choices": [{"index": 2, "text": "c" * 6, "finish_reason": "stop", "logprobs": None},
                        {"index": 0, "text": "a" * 3, "finish_reason": "length", "logprobs": None},
                        {"index": 1, "text": "b" * 5, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 14, "completion_tokens": 28, "total_tokens": 42,
                      "prompt_tokens_details": {"cached_tokens": 3}}, **extra}


def test_split_by_index_gives_each_prompt_its_own_well_formed_answer() -> None:
    parts = split_answer(answer(), PROMPTS)
    assert [p["choices"][0]["text"] if p else None for p in parts] == ["aaa", "bbbbb", "cccccc"]
    assert all(p is not None for p in parts)
    for i, part in enumerate(parts):
        assert part is not None
        assert part["object"] == "text_completion" and part["model"] == "m"
        assert part["choices"][0]["index"] == 0
        assert part["id"] == f"cmpl-1-{i}"
    assert parts[0] is not None and parts[0]["choices"][0]["finish_reason"] == "length"


def test_vllm_usage_is_split_in_proportion_and_adds_up() -> None:
    parts = split_answer(answer(), PROMPTS)
    usages = [p["usage"] for p in parts if p is not None]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert sum(u[field] for u in usages) == answer()["usage"][field]
    assert sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages) == 3
    for u in usages:
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # prompts of 3, 5 and 6 characters share 14 prompt tokens; answers of 3, 5, 6 share 28
    assert [u["prompt_tokens"] for u in usages] == [3, 5, 6]
    assert [u["completion_tokens"] for u in usages] == [6, 10, 12]


def test_llamacpp_usage_covers_the_first_prompt_and_the_rest_is_estimated() -> None:
    raw = answer(usage={"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
                 timings={"prompt_n": 3, "predicted_n": 6})
    parts = split_answer(raw, PROMPTS)
    usages = [p["usage"] for p in parts if p is not None]
    assert usages[0] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert [u["prompt_tokens"] for u in usages] == [3, 5, 6]
    assert [u["completion_tokens"] for u in usages] == [6, 10, 12]
    assert all("timings" not in p for p in parts if p is not None)


def test_a_missing_choice_is_none_and_no_usage_means_none() -> None:
    raw = answer()
    raw["choices"] = raw["choices"][:2]          # index 1 is missing
    del raw["usage"]
    parts = split_answer(raw, PROMPTS)
    assert parts[1] is None
    assert parts[0] is not None and "usage" not in parts[0]


@pytest.mark.parametrize(("total", "weights", "expected"), [
    (10, [1, 1, 1], [4, 3, 3]),
    (10, [0, 0], [5, 5]),
    (7, [1, 0, 6], [1, 0, 6]),
    (0, [3, 4], [0, 0]),
    (5, [2, 2, 2, 2, 2], [1, 1, 1, 1, 1]),
])
def test_shares_add_up(total: int, weights: list[int], expected: list[int]) -> None:
    prompts = ["x" * w for w in weights]
    shares = share_usage({"prompt_tokens": total}, prompts, [""] * len(prompts))
    assert [s["prompt_tokens"] for s in shares] == expected
