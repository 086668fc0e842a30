"""PURE batch decisions for one backend: when to flush, what may be merged, how answers split.

mitmproxy-style: ``BatchQueue`` is a state machine fed events stamped with the time they
happened (``arrive``, ``tick``, ``leave``, ``dispatched``) that answers with decisions
(``Flush``, ``WakeAt``, ``Reject``). It never reads a clock, sleeps or does I/O; batcher.py is
the asyncio shell that carries the decisions out.

Rules:
- items with the same ``group`` key wait together; a group flushes when it holds ``max_batch``
  items or when its first item has waited ``max_wait_s``, whichever comes first;
- an item without a group (nothing to merge it with) flushes at once, as does everything when
  the window is 0 or ``max_batch`` is 1;
- ``depth`` counts items waiting in a window plus items flushed but not yet dispatched (the
  shell reports ``dispatched`` when their backend call starts or they are dropped); an arrival
  that finds ``depth >= max_queue`` is rejected, so excess load is shed before it queues.

The merge helpers below decide which requests a multi-prompt backend (vLLM, llama.cpp) can take
in one ``/v1/completions`` call, build that call, and split its answer back per request.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

T = TypeVar("T")

#: a deadline this close counts as reached (event-loop timers may fire a hair early)
DUE_TOLERANCE_S = 1e-4
COMPLETIONS_PATHS = frozenset({"/v1/completions", "/completions"})
CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch: int = 16
    max_wait_s: float = 0.0
    max_queue: int = 1024
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        if self.max_wait_s < 0 or self.retry_after_s <= 0:
            raise ValueError("max_wait_s must be >= 0 and retry_after_s > 0")


@dataclass(frozen=True, slots=True)
class Flush(Generic[T]):
    """Send these items now (one merged call, or one call each)."""

    items: tuple[T, ...]
    waited_s: float        # how long the oldest of them waited in the window


@dataclass(frozen=True, slots=True)
class WakeAt:
    """Call ``tick`` at this time (the earliest deadline of a waiting group)."""

    at: float


@dataclass(frozen=True, slots=True)
class Reject(Generic[T]):
    """The queue is full: refuse this item, ask the client to come back later."""

    item: T
    retry_after_s: float


Decision = Flush[T] | WakeAt | Reject[T]


@dataclass(slots=True)
class _Group(Generic[T]):
    opened: float
    items: list[T] = field(default_factory=list)


class BatchQueue(Generic[T]):
    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        # insertion order is opening order, so the first group has the earliest deadline
        self._groups: dict[Hashable, _Group[T]] = {}
        self._waiting = 0
        self._handed = 0

    @property
    def depth(self) -> int:
        """Items queued for this backend: in a window, or flushed and waiting to start."""
        return self._waiting + self._handed

    @property
    def waiting(self) -> int:
        return self._waiting

    def arrive(self, now: float, item: T, group: Hashable | None = None) -> list[Decision[T]]:
        policy = self.policy
        if self.depth >= policy.max_queue:
            return [Reject(item, policy.retry_after_s)]
        if group is None or policy.max_wait_s <= 0 or policy.max_batch == 1:
            self._handed += 1
            return [Flush((item,), 0.0), *self._wake()]
        batch = self._groups.get(group)
        if batch is None:
            batch = self._groups[group] = _Group(opened=now)
        batch.items.append(item)
        self._waiting += 1
        out: list[Decision[T]] = []
        if len(batch.items) >= policy.max_batch:
            out.append(self._flush(group, now))
        return [*out, *self._wake()]

    def tick(self, now: float) -> list[Decision[T]]:
        due = [key for key, batch in self._groups.items()
               if batch.opened + self.policy.max_wait_s <= now + DUE_TOLERANCE_S]
        out: list[Decision[T]] = [self._flush(key, now) for key in due]
        return [*out, *self._wake()]

    def leave(self, item: T) -> bool:
        """Drop an item still waiting in a window (its client left); False if it is not there."""
        for key, batch in self._groups.items():
            for i, queued in enumerate(batch.items):
                if queued is item:
                    del batch.items[i]
                    self._waiting -= 1
                    if not batch.items:
                        del self._groups[key]
                    return True
        return False

    def drain(self) -> list[T]:
        """Take every item still waiting in a window (shutting down)."""
        items = [item for batch in self._groups.values() for item in batch.items]
        self._groups.clear()
        self._waiting = 0
        return items

    def dispatched(self, n: int = 1) -> None:
        """``n`` flushed items started their backend call, or were dropped before it."""
        if n > self._handed:
            raise ValueError(f"{n} dispatched but only {self._handed} were flushed")
        self._handed -= n

    def _flush(self, key: Hashable, now: float) -> Flush[T]:
        batch = self._groups.pop(key)
        self._waiting -= len(batch.items)
        self._handed += len(batch.items)
        return Flush(tuple(batch.items), max(0.0, now - batch.opened))

    def _wake(self) -> list[Decision[T]]:
        if not self._groups:
            return []
        first = next(iter(self._groups.values()))
        return [WakeAt(first.opened + self.policy.max_wait_s)]


# -- merging for multi-prompt backends --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mergeable:
    """A non-streaming single-prompt /v1/completions request another can share a call with."""

    key: Hashable                # same key: same path, auth and every parameter but the prompt
    prompt: str
    params: Mapping[str, Any]    # the body without its prompt


def mergeable(method: str, path: str, body: bytes, client_auth: str | None,
              headers: Mapping[str, str]) -> Mergeable | None:
    if method != "POST" or path not in COMPLETIONS_PATHS:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("prompt"), str):
        return None
    if parsed.get("stream") or any(parsed.get(name) not in (1, None) for name in ("n", "best_of")):
        return None  # a stream, or several choices per prompt: indexes would not map back
    params = {k: v for k, v in parsed.items() if k != "prompt"}
    # the auth and organisation headers go out with the merged call, so they must match too
    key = (path, client_auth or "", headers.get("openai-organization", ""),
           headers.get("openai-project", ""), orjson.dumps(params, option=orjson.OPT_SORT_KEYS))
    return Mergeable(key=key, prompt=parsed["prompt"], params=params)


def fanout_group(method: str, path: str) -> str | None:
    """Chat-only backends: completion calls share a window and are fanned out together."""
    return "fanout" if method == "POST" and path in COMPLETIONS_PATHS | CHAT_PATHS else None


def merged_body(params: Mapping[str, Any], prompts: Sequence[str]) -> bytes:
    return orjson.dumps({**params, "prompt": list(prompts)})


def split_answer(answer: Mapping[str, Any], prompts: Sequence[str]) -> list[dict[str, Any] | None]:
    """One ``text_completion`` per prompt, each with its own choice (as index 0) and a usage share;
    None where the merged answer has no choice for that prompt."""
    choices: dict[int, Mapping[str, Any]] = {}
    for choice in answer.get("choices") or ():
        if isinstance(choice, Mapping) and isinstance(choice.get("index"), int):
            choices.setdefault(choice["index"], choice)
    texts = [str(choices[i].get("text") or "") if i in choices else "" for i in range(len(prompts))]
    usage = answer.get("usage")
    # llama.cpp's usage (like its ``timings``) covers only the first prompt of a list
    first_only = "timings" in answer and len(prompts) > 1
    shares = share_usage(usage, prompts, texts, first_only=first_only) if isinstance(usage, Mapping) else None
    ident = str(answer.get("id") or "cmpl-batch")
    out: list[dict[str, Any] | None] = []
    for i in range(len(prompts)):
        if i not in choices:
            out.append(None)
            continue
        one = {k: v for k, v in answer.items() if k not in ("choices", "usage", "timings")}
        one["id"] = f"{ident}-{i}"
        one["choices"] = [{**choices[i], "index": 0}]
        if shares is not None:
            one["usage"] = shares[i]
        out.append(one)
    return out


def share_usage(usage: Mapping[str, Any], prompts: Sequence[str], texts: Sequence[str], *,
                first_only: bool = False) -> list[dict[str, Any]]:
    """Attribute a merged call's usage to its requests.

    Counts are split in proportion to characters: prompt-side counts by prompt length,
    ``completion*`` counts by answer length, with largest remainders so the shares add up to
    exactly what the backend reported. With ``first_only`` (llama.cpp reports the first
    prompt's usage only) the first request keeps the reported figures and the others get an
    estimate scaled from them by the same character ratios.
    """
    prompt_w = [len(p) for p in prompts]
    text_w = [len(t) for t in texts]

    def split(top: str, value: Any) -> list[Any]:
        if isinstance(value, Mapping):
            rows: list[dict[str, Any]] = [{} for _ in prompts]
            for key, inner in value.items():
                for row, part in zip(rows, split(top or str(key), inner), strict=True):
                    row[str(key)] = part
            return rows
        if not isinstance(value, int) or isinstance(value, bool):
            return [value for _ in prompts]
        weights = text_w if top.startswith("completion") else prompt_w
        return _scale(value, weights) if first_only else _apportion(value, weights)

    shares: list[dict[str, Any]] = split("", usage)
    for row in shares:
        if "total_tokens" in row and isinstance(row.get("prompt_tokens"), int) \
                and isinstance(row.get("completion_tokens"), int):
            row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
    return shares


def _apportion(total: int, weights: Sequence[int]) -> list[int]:
    """Largest-remainder split of ``total`` by ``weights`` (equal parts when all are 0)."""
    n = len(weights)
    wsum = sum(weights)
    exact = [total * w / wsum for w in weights] if wsum > 0 else [total / n] * n
    parts = [math.floor(x) for x in exact]
    left = total - sum(parts)
    order = sorted(range(n), key=lambda i: (parts[i] - exact[i], i))
    for i in order[:left]:
        parts[i] += 1
    return parts


def _scale(first: int, weights: Sequence[int]) -> list[int]:
    base = weights[0]
    return [first if i == 0 or base == 0 else round(first * w / base) for i, w in enumerate(weights)]
