"""Server-sent events for OpenAI-style streams: parse, encode, accumulate, replay.

Pure: no I/O and no event loop, so every edge case here is a table-driven unit test.

- ``SSEParser`` turns upstream bytes into events that keep their exact ``raw`` bytes, so the
  proxy can forward what it parsed without re-encoding it.
- ``ChatAccumulator`` / ``CompletionAccumulator`` rebuild the non-streaming answer from chunks,
  which is what the cache stores, and record what the write gate needs (``[DONE]``, errors,
  finish reasons).
- ``completion_to_chunks`` / ``text_completion_to_chunks`` turn a stored answer back into chunks
  for an SSE replay; accumulating them gives the stored answer back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, Protocol, TypeVar

import orjson

DONE = b"data: [DONE]\n\n"
DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
_OPTIONAL_HEAD_KEYS = ("system_fingerprint", "service_tier")
_HEAD_KEYS = ("id", "created", "model", *_OPTIONAL_HEAD_KEYS)


class SSEError(ValueError):
    """The byte stream cannot be parsed safely (oversize event, invalid UTF-8).

    The parser stays broken afterwards: the caller can still forward raw bytes but must
    neither trust nor cache what it accumulated.
    """


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str | None = None
    comment: str | None = None
    raw: bytes = b""
    #: False only for a tail flushed by ``finish()`` that never got its blank line
    complete: bool = True

    @property
    def is_comment(self) -> bool:
        """A keep-alive such as DeepSeek's ``: keep-alive``: forward ``raw``, nothing to parse."""
        return self.comment is not None and not self.data and self.event is None


class SSEParser:
    """Incremental ``text/event-stream`` parser.

    Lines are split on bytes, not text: CR and LF never occur inside a UTF-8 sequence, so a
    chunk that ends mid-character simply leaves the line incomplete. A CR at the very end of the
    input is held back until the next byte shows whether it is half of a CRLF; that keeps the
    events independent of chunking, at the cost of one chunk of delay for CR-only streams.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()   # bytes not yet split into lines
        self._raw = bytearray()   # every byte of the event being built, blank lines before it too
        self._data: list[str] = []
        self._event: str | None = None
        self._comments: list[str] = []
        self._has_fields = False
        self._at_start = True
        self._broken: SSEError | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        if self._broken is not None:
            raise self._broken
        if self._buf and not self._buf.endswith(b"\r") and b"\n" not in data and b"\r" not in data:
            # fast path for a long line arriving in many pieces: no re-scan, no copy
            self._buf += data
            self._check_size()
            return []
        events = self._split(bytes(self._buf) + data, final=False)
        self._check_size()
        return events

    def finish(self) -> list[SSEEvent]:
        """Flush at end of stream; an event cut before its blank line comes back incomplete."""
        if self._broken is not None:
            raise self._broken
        events = self._split(bytes(self._buf), final=True)
        if self._buf:
            tail = bytes(self._buf)
            self._buf.clear()
            self._line(tail, tail, events)
        if self._has_fields:
            events.append(self._dispatch(complete=False))
        self._raw.clear()
        return events

    def _split(self, buf: bytes, *, final: bool) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        pos = 0
        for match in _LINE_END.finditer(buf):
            if not final and match.end() == len(buf) and match.group() == b"\r":
                break
            self._line(buf[pos:match.start()], buf[pos:match.end()], events)
            pos = match.end()
        self._buf = bytearray(buf[pos:])
        return events

    def _line(self, content: bytes, full: bytes, events: list[SSEEvent]) -> None:
        self._raw += full
        if len(self._raw) > self._max:
            self._fail(f"event larger than {self._max} bytes")
        if self._at_start:
            self._at_start = False
            content = content.removeprefix(_BOM)
        if not content:
            if self._has_fields:
                events.append(self._dispatch(complete=True))
            return
        self._has_fields = True
        try:
            self._field(content.decode("utf-8"))
        except UnicodeDecodeError:
            self._fail("event stream is not valid UTF-8")

    def _field(self, line: str) -> None:
        if line.startswith(":"):
            self._comments.append(_strip_space(line[1:]))
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(_strip_space(value))
        elif name == "event":
            self._event = _strip_space(value)
        # id, retry and unknown fields matter to nobody here; they stay in ``raw``

    def _dispatch(self, *, complete: bool) -> SSEEvent:
        event = SSEEvent(data="\n".join(self._data), event=self._event,
                         comment="\n".join(self._comments) if self._comments else None,
                         raw=bytes(self._raw), complete=complete)
        self._raw.clear()
        self._data = []
        self._event = None
        self._comments = []
        self._has_fields = False
        return event

    def _check_size(self) -> None:
        if len(self._raw) + len(self._buf) > self._max:
            self._fail(f"event larger than {self._max} bytes")

    def _fail(self, message: str) -> NoReturn:
        self._broken = SSEError(message)
        raise self._broken


def _strip_space(value: str) -> str:
    return value[1:] if value.startswith(" ") else value


def encode_event(data: bytes | str) -> bytes:
    """One ``data:`` event; embedded line breaks become extra ``data:`` lines, as SSE requires."""
    if isinstance(data, str):
        data = data.encode()
    if b"\n" not in data and b"\r" not in data:
        return b"data: " + data + b"\n\n"
    lines = _LINE_END.split(data)
    return b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def encode_json_event(obj: Any) -> bytes:
    return encode_event(orjson.dumps(obj))


def error_body(message: str, type: str = "upstream_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def encode_error_event(message: str, type: str = "upstream_error", code: str | None = None) -> bytes:
    """An in-band error: the openai SDK raises ``APIError`` for an event whose JSON has a truthy
    ``error`` (taking ``error.message``), so a broken stream never looks like a short answer."""
    return encode_json_event(error_body(message, type, code))


# -- accumulation -------------------------------------------------------------------------------

def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _index(value: Any, default: int) -> int:
    # checked here because a bad index would otherwise only blow up when results are sorted
    if value is None:
        return default
    if not isinstance(value, int):
        raise TypeError(f"expected an integer index, got {type(value).__name__}")
    return value


def _append(parts: list[str] | None, value: Any) -> list[str] | None:
    """``None`` means "never sent", which the final message must tell apart from ``""``."""
    if value is not None:
        parts = [] if parts is None else parts
        parts.append(_text(value))
    return parts


def _join(parts: list[str] | None) -> str | None:
    return None if parts is None else "".join(parts)


def _merge_logprobs(acc: dict[str, Any] | None, new: Any) -> dict[str, Any] | None:
    """Lists (chat ``content``/``refusal``, legacy ``tokens``, ``text_offset``, ...) are extended."""
    if not isinstance(new, Mapping):
        return acc
    acc = {} if acc is None else acc
    for key, value in new.items():
        if isinstance(value, list):
            if isinstance(acc.get(key), list):
                acc[key].extend(value)
            else:
                acc[key] = list(value)
        elif acc.get(key) is None:
            acc[key] = value
    return acc


@dataclass
class _ChatChoice:
    role: str = "assistant"
    content: list[str] | None = None
    reasoning: list[str] | None = None
    refusal: list[str] | None = None
    refusal_sent: bool = False
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None

    def add(self, choice: Mapping[str, Any]) -> None:
        delta = choice.get("delta") or {}
        self.role = delta.get("role") or self.role
        self.content = _append(self.content, delta.get("content"))
        self.reasoning = _append(self.reasoning, delta.get("reasoning_content"))
        self.refusal = _append(self.refusal, delta.get("refusal"))
        self.refusal_sent = self.refusal_sent or "refusal" in delta
        for pos, call in enumerate(delta.get("tool_calls") or ()):
            self._add_tool_call(pos, call)
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.logprobs = _merge_logprobs(self.logprobs, choice.get("logprobs"))

    def _add_tool_call(self, pos: int, delta: Mapping[str, Any]) -> None:
        call = self.tool_calls.setdefault(_index(delta.get("index"), pos), {
            "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        # some servers repeat the id in every chunk: the first one is the id, not a prefix
        call["id"] = call["id"] or delta.get("id")
        call["type"] = delta.get("type") or call["type"]
        function = delta.get("function") or {}
        for key in ("name", "arguments"):
            if function.get(key) is not None:
                call["function"][key] += _text(function[key])

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": _join(self.content)}
        if self.reasoning is not None:
            message["reasoning_content"] = _join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        if self.refusal_sent:
            message["refusal"] = _join(self.refusal)
        return message


@dataclass
class _TextChoice:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None

    def add(self, choice: Mapping[str, Any]) -> None:
        _append(self.text, choice.get("text"))
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.logprobs = _merge_logprobs(self.logprobs, choice.get("logprobs"))


class _Choice(Protocol):
    finish_reason: str | None

    def add(self, choice: Mapping[str, Any]) -> None: ...


_C = TypeVar("_C", bound=_Choice)


class _Accumulator(Generic[_C]):
    def __init__(self, object_: str, new_choice: Callable[[], _C]) -> None:
        self.saw_done = False
        #: the first error: an upstream error event, or what made a chunk unreadable
        self.error: dict[str, Any] | None = None
        self.usage: dict[str, Any] | None = None
        self._object = object_
        self._new_choice = new_choice
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _C] = {}

    def add_event(self, event: SSEEvent) -> None:
        if self.saw_done or not event.data:
            return
        if event.data.startswith("[DONE]"):
            # a [DONE] cut off before its blank line is not a clean end
            self.saw_done = event.complete
            return
        try:
            obj = orjson.loads(event.data)
        except (orjson.JSONDecodeError, RecursionError):
            self._record("stream event is not valid JSON")
            return
        if obj is None:
            return
        if not isinstance(obj, dict):
            self._record("stream event is not a JSON object")
        elif obj.get("error"):
            error = obj["error"]
            self._record(error if isinstance(error, dict) else error_body(str(error))["error"])
        else:
            self.add_chunk(obj)

    def add_chunk(self, chunk: Mapping[str, Any]) -> None:
        try:
            for key in _HEAD_KEYS:
                if key in chunk and (chunk[key] is not None or key not in self._head):
                    self._head[key] = chunk[key]
            usage = chunk.get("usage")
            if usage is not None:
                if not isinstance(usage, Mapping):
                    raise TypeError("usage is not an object")
                self.usage = dict(usage)
            for choice in chunk.get("choices") or ():
                index = _index(choice.get("index"), 0)
                if index not in self._choices:
                    self._choices[index] = self._new_choice()
                self._choices[index].add(choice)
        except (TypeError, AttributeError, ValueError) as exc:
            self._record(f"malformed stream chunk: {exc}")

    def _record(self, error: str | dict[str, Any]) -> None:
        if self.error is None:
            self.error = error if isinstance(error, dict) else error_body(error, "invalid_stream")["error"]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [self._choices[i].finish_reason for i in sorted(self._choices)]

    @property
    def complete(self) -> bool:
        """Ended with ``[DONE]``, no error, and every choice has a finish reason."""
        reasons = self.finish_reasons
        return self.saw_done and self.error is None and bool(reasons) and None not in reasons

    def _result(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {"id": self._head.get("id"), "object": self._object,
                                  "created": self._head.get("created"), "model": self._head.get("model")}
        result.update((k, self._head[k]) for k in _OPTIONAL_HEAD_KEYS if k in self._head)
        result["choices"] = choices
        if self.usage is not None:
            result["usage"] = self.usage
        return result


class ChatAccumulator(_Accumulator[_ChatChoice]):
    """Rebuilds a ``chat.completion`` from ``chat.completion.chunk`` events (OpenAI, DeepSeek)."""

    def __init__(self) -> None:
        super().__init__("chat.completion", _ChatChoice)

    def result(self) -> dict[str, Any]:
        return self._result([
            {"index": i, "message": c.message(), "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for i, c in sorted(self._choices.items())])


class CompletionAccumulator(_Accumulator[_TextChoice]):
    """Rebuilds a legacy ``text_completion`` from its stream."""

    def __init__(self) -> None:
        super().__init__("text_completion", _TextChoice)

    def result(self) -> dict[str, Any]:
        return self._result([
            {"text": "".join(c.text), "index": i, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
            for i, c in sorted(self._choices.items())])


def accumulate(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The final object for a chunk sequence; legacy completions are told by their ``object``."""
    acc: ChatAccumulator | CompletionAccumulator | None = None
    for chunk in chunks:
        if acc is None:
            text = chunk.get("object") == "text_completion"
            acc = CompletionAccumulator() if text else ChatAccumulator()
        acc.add_chunk(chunk)
    return (acc or ChatAccumulator()).result()


# -- replay -------------------------------------------------------------------------------------

def _pieces(text: str, size: int) -> list[str]:
    # str indexes code points, so a piece never ends inside a character or surrogate pair
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


_MakeChunk = Callable[[list[dict[str, Any]]], dict[str, Any]]


def _chunk_maker(completion: Mapping[str, Any], obj: str, *, include_usage: bool,
                 piece_chars: int) -> _MakeChunk:
    if piece_chars < 1:
        raise ValueError("piece_chars must be at least 1")
    head = {"id": completion.get("id"), "object": obj, "created": completion.get("created"),
            "model": completion.get("model"), "system_fingerprint": completion.get("system_fingerprint")}
    if "service_tier" in completion:
        head["service_tier"] = completion["service_tier"]

    def make(choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**head, "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk
    return make


def _usage_tail(completion: Mapping[str, Any], make: _MakeChunk, include_usage: bool) -> list[dict[str, Any]]:
    if not include_usage or completion.get("usage") is None:
        return []
    return [{**make([]), "usage": completion["usage"]}]


def _chat_deltas(message: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    content = message.get("content")
    first: dict[str, Any] = {"role": message.get("role") or "assistant",
                             "content": None if content is None else ""}
    if "refusal" in message:
        first["refusal"] = None
    deltas = [first]
    if message.get("reasoning_content") is not None:
        deltas += [{"reasoning_content": p} for p in _pieces(message["reasoning_content"], size)]
    if content:
        deltas += [{"content": p} for p in _pieces(content, size)]
    if message.get("refusal") is not None:
        deltas += [{"refusal": p} for p in _pieces(message["refusal"], size)]
    for index, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        deltas.append({"tool_calls": [{"index": index, "id": call.get("id"), "type": call.get("type"),
                                       "function": {"name": function.get("name"), "arguments": ""}}]})
        deltas += [{"tool_calls": [{"index": index, "function": {"arguments": p}}]}
                   for p in _pieces(function.get("arguments") or "", size) if p]
    return deltas


def completion_to_chunks(completion: Mapping[str, Any], *, include_usage: bool,
                         piece_chars: int = 64) -> list[dict[str, Any]]:
    """Chunks that replay a stored ``chat.completion`` the way OpenAI streams it.

    The caller sets a fresh ``id``/``created`` first. Logprobs ride on each choice's final chunk,
    since token boundaries are not kept and re-splitting them could only misalign them.
    """
    make = _chunk_maker(completion, "chat.completion.chunk", include_usage=include_usage,
                        piece_chars=piece_chars)
    chunks = []
    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        for delta in _chat_deltas(choice.get("message") or {}, piece_chars):
            chunks.append(make([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]))
        chunks.append(make([{"index": index, "delta": {}, "logprobs": choice.get("logprobs"),
                             "finish_reason": choice.get("finish_reason")}]))
    return chunks + _usage_tail(completion, make, include_usage)


def text_completion_to_chunks(completion: Mapping[str, Any], *, include_usage: bool,
                              piece_chars: int = 64) -> list[dict[str, Any]]:
    """Chunks that replay a stored legacy ``text_completion``."""
    make = _chunk_maker(completion, "text_completion", include_usage=include_usage,
                        piece_chars=piece_chars)
    chunks = []
    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        chunks += [make([{"text": p, "index": index, "logprobs": None, "finish_reason": None}])
                   for p in _pieces(choice.get("text") or "", piece_chars) if p]
        chunks.append(make([{"text": "", "index": index, "logprobs": choice.get("logprobs"),
                             "finish_reason": choice.get("finish_reason")}]))
    return chunks + _usage_tail(completion, make, include_usage)
