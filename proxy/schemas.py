"""OpenAI-shaped request models: validation only.

Unknown fields are kept (extra="allow") and forwarded untouched; the proxy keeps working with the
raw dict after validation so nothing a client sent is lost or reformatted on the way upstream.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from .errors import InvalidRequest

# Far above any real model's output window, low enough that nobody mistakes it for "unbounded".
MAX_TOKENS_CEILING = 1 << 22


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ContentPart(_Open):
    type: StrictStr


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class _Sampling(_Open):
    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1)] | None = None
    presence_penalty: Annotated[StrictFloat | StrictInt, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[StrictFloat | StrictInt, Field(ge=-2, le=2)] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


def _param(loc: tuple[int | str, ...]) -> str | None:
    if not loc:
        return None
    out = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"str", "list[ContentPart]", "int", "float"} or "[" in str(part):
            # pydantic names union members in the location; they mean nothing to a client
            continue
        else:
            out += f".{part}"
    return out


def validate(model: type[_Sampling], body: object) -> None:
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = _param(tuple(first["loc"]))
        where = f" at '{param}'" if param else ""
        raise InvalidRequest(f"Invalid request{where}: {first['msg']}", param=param) from None


def validate_chat(body: object) -> None:
    validate(ChatRequest, body)


def validate_completion(body: object) -> None:
    validate(CompletionRequest, body)
