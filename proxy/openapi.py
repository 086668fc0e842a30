"""The OpenAPI 3.1 document of the proxy's own routes, served at ``GET /openapi.json``.

The request bodies come from the pydantic models that validate them (proxy/schemas.py), so the
document and the validation cannot drift apart; schemathesis fuzzes the proxy from it
(tests/security/test_hostile_input.py, bench/fuzz.py). Responses are described loosely: the
proxy relays what the upstream answers.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from pydantic.json_schema import models_json_schema

from .schemas import ChatRequest, CompletionRequest

_REF = "#/components/schemas/{model}"

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}

_COMPLETION = {
    "type": "object",
    "description": "The upstream's answer (chat.completion or text_completion), or a cached one "
                   "with a fresh id and created time.",
    "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                   "created": {"type": "integer"}, "model": {"type": "string"},
                   "choices": {"type": "array", "items": {"type": "object"}},
                   "usage": {"type": "object"}},
}

_CACHE_HEADERS = {
    "x-semcache": {"description": "How the answer was served: exact, semantic, miss, coalesced or "
                                  "bypass", "schema": {"type": "string"}},
    "x-semcache-similarity": {"description": "Similarity of a semantic hit (its tenant's own "
                                             "cached question)", "schema": {"type": "string"}},
}

_REQUEST_HEADERS = [
    {"name": "Cache-Control", "in": "header", "required": False,
     "description": "no-cache: skip the lookup, store the answer; no-store: neither",
     "schema": {"type": "string"}},
    {"name": "x-semcache-threshold", "in": "header", "required": False,
     "description": "A stricter similarity threshold for this request (it can only tighten)",
     "schema": {"type": "string"}},
]


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": {"$ref": _REF.format(
                               model="Error")}}}}
    if retry_after:
        out["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying",
                                          "schema": {"type": "string"}}}
    return out


def _api_errors() -> dict[str, Any]:
    return {
        "400": _error("Invalid request (OpenAI error shape)"),
        "401": _error("Missing or unknown proxy key (keys mode), or rejected by the upstream"),
        "413": _error("Request body larger than server.max_body_bytes"),
        "429": _error("Per-tenant rate limit (limits) or the upstream's own 429", retry_after=True),
        "502": _error("No usable answer from the backend"),
        "503": _error("Shedding load (max_in_flight, batch queue, draining) or every backend down",
                      retry_after=True),
        "504": _error("The backend did not answer in time"),
    }


def _completion_operation(name: str, summary: str, schema: str) -> dict[str, Any]:
    return {
        "operationId": name,
        "summary": summary,
        "parameters": _REQUEST_HEADERS,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": _REF.format(model=schema)}}}},
        "responses": {
            "200": {"description": "The answer: JSON, or server-sent events when stream is true",
                    "headers": _CACHE_HEADERS,
                    "content": {"application/json": {"schema": {"$ref": _REF.format(
                        model="Completion")}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            **_api_errors(),
        },
    }


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _admin(name: str, summary: str, method_body: bool, ok: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": name, "summary": summary, "security": [{"adminToken": []}],
        "responses": {"200": ok, "400": _error("Invalid request"),
                      "401": _error("Not an admin: no admin token, or not from loopback"),
                      "404": _error("The cache is disabled, or nothing matched")},
    }
    if method_body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"type": "object"}}}}
    return operation


_CLIENT_PARAMETERS: list[dict[str, Any]] = [
    {"name": "X-Semcache-Client-Authorization", "in": "header", "required": False,
     "description": "The client's own Authorization (the tenant is worked out from it as for a "
                    "normal request); without an admin token, Authorization may carry it",
     "schema": {"type": "string"}},
    {"name": "route", "in": "query", "required": False,
     "description": "Which route the body is for (default: chat when it has messages)",
     "schema": {"type": "string", "enum": ["chat", "completions"]}},
]

_FEEDBACK = {
    "type": "object",
    "required": ["evicted", "kind", "prompt", "created"],
    "properties": {"evicted": {"type": "string", "description": "The evicted entry's key"},
                   "kind": {"type": "string", "enum": ["explicit"]},
                   "prompt": {"type": ["string", "null"], "description": "Its cached prompt"},
                   "created": {"type": "number"}},
}

_NEIGHBOUR = {
    "type": "object",
    "properties": {
        "key": {"type": "string"}, "score": {"type": "number", "description": "Cosine similarity"},
        "above_threshold": {"type": "boolean"},
        "refused_by": {"type": ["string", "null"],
                       "description": "The first enabled guard that refuses it, \"verifier\", or "
                                      "\"feedback\" (at or below the floor learned for the entry)"},
        "guards_fired": {"type": "array", "items": {"type": "string"}},
        "verifier_score": {"type": ["number", "null"],
                           "description": "P(same meaning) by the verifier, when one covers it"},
        "floor": {"type": ["number", "null"], "description": "Similarity to beat, from feedback"},
        "live": {"type": "boolean"}, "prompt": {"type": ["string", "null"]}},
}

_EXPLAIN = {
    "type": "object",
    "required": ["route", "scope", "key", "exact_hit", "semantic", "threshold", "guards", "neighbours",
                 "decision", "served_by"],
    "properties": {
        "route": {"type": "string"}, "scope": {"type": "string"}, "key": {"type": "string"},
        "embedder": {"type": ["string", "null"]}, "exact_hit": {"type": "boolean"},
        "semantic": {"type": "boolean"}, "reason": {"type": ["string", "null"]},
        "threshold": {"type": "number"}, "guards": {"type": "array", "items": {"type": "string"}},
        "neighbours": {"type": "array", "items": _NEIGHBOUR},
        "decision": {"type": "string", "enum": ["exact", "semantic", "miss"]},
        "served_by": {"type": ["string", "null"]}},
}


def _admin_on_request(name: str, summary: str, ok: dict[str, Any], *, with_key: bool,
                      extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An admin call that takes a client's request body (chat or completions)."""
    operation = _admin(name, summary, True, ok)
    bodies: list[dict[str, Any]] = [{"$ref": _REF.format(model="ChatRequest")},
                                    {"$ref": _REF.format(model="CompletionRequest")}]
    if with_key:
        bodies.insert(0, {"type": "object", "required": ["key"], "additionalProperties": False,
                          "properties": {"key": {"type": "string",
                                                 "description": "An entry key, from explain"}}})
    operation["requestBody"] = {"required": True, "content": {"application/json": {
        "schema": {"anyOf": bodies}}}}
    operation["parameters"] = [*_CLIENT_PARAMETERS, *(extra or [])]
    return operation


def _json_schema(node: Any) -> Any:
    """pydantic writes a bound on a union (``StrictFloat | StrictInt`` with ``ge``) as ``ge`` /
    ``le``, which JSON Schema does not know: make them ``minimum`` / ``maximum``."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    renamed = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
    return {renamed.get(key, key): _json_schema(value) for key, value in node.items()
            if not (key == "title" and isinstance(value, str))}  # pydantic's titles are noise


@functools.cache
def _document() -> dict[str, Any]:
    _, defs = models_json_schema([(ChatRequest, "validation"), (CompletionRequest, "validation")],
                                 ref_template=_REF)
    schemas = _json_schema(dict(defs.get("$defs", {})))
    schemas["Error"] = _ERROR
    schemas["Completion"] = _COMPLETION
    return {
        "openapi": "3.1.0",
        "info": {"title": "semcache-proxy", "version": "0.1.0",
                 "description": "OpenAI-compatible caching proxy. Every error is OpenAI-shaped: "
                                "{\"error\": {\"message\", \"type\", \"param\", \"code\"}}."},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "Pass-through mode: the upstream key (it also decides "
                                          "the tenant); keys mode: a proxy key"},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "The admin token (server.admin_token_env); "
                                              "without one, admin calls are loopback-only"},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {"post": _completion_operation(
                "createChatCompletion", "Chat completion, cached by tenant and scope", "ChatRequest")},
            "/v1/completions": {"post": _completion_operation(
                "createCompletion", "Text completion, cached by tenant and scope",
                "CompletionRequest")},
            "/v1/models": {"get": {"operationId": "listModels",
                                   "summary": "Passed to the default backend untouched (no caching)",
                                   "responses": {"200": _json("The backend's answer"),
                                                 **_api_errors()}}},
            "/healthz": {"get": {"operationId": "healthz", "security": [],
                                 "summary": "Liveness: the process serves HTTP",
                                 "responses": {"200": _json("Alive")}}},
            "/readyz": {"get": {"operationId": "readyz", "security": [],
                                "summary": "Readiness, with notes on backends and the store",
                                "responses": {"200": _json("Ready"),
                                              "503": _json("Starting or draining")}}},
            "/metrics": {"get": {"operationId": "metrics", "security": [],
                                 "summary": "Prometheus exposition (bounded label sets)",
                                 "responses": {"200": {"description": "Metrics", "content": {
                                     "text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "security": [],
                                      "summary": "This document",
                                      "responses": {"200": _json("OpenAPI 3.1 document")}}},
            "/admin/cache/stats": {"get": _admin("cacheStats", "Entries and bytes in the cache",
                                                 False, _json("Cache fill"))},
            "/admin/cache/flush": {"post": _admin("cacheFlush", "Forget every cached answer",
                                                  False, _json("How many entries were removed"))},
            "/admin/cache/feedback": {"post": _admin_on_request(
                "cacheFeedback", "Mark a served answer wrong: {\"key\": ...} or the client's request "
                "body (evicts the entry that served it, leaves its similarity as the entry's floor; "
                "counted in semcache_cache_feedback_total{kind=\"explicit\"})",
                _json("The evicted entry", _FEEDBACK), with_key=True)},
            "/admin/cache/explain": {"post": _admin_on_request(
                "cacheExplain", "What the cache would answer a client's request body with, and why: "
                "scope, exact key, the top-k neighbours with similarity, guards and verifier score; "
                "nothing is served, stored or sent to a backend",
                _json("The decision and the neighbours", _EXPLAIN), with_key=False,
                extra=[{"name": "k", "in": "query", "required": False,
                        "description": "Neighbours to list (default cache.top_k)",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 64}}])},
            "/admin/debug/runtime": {"get": _admin("debugRuntime", "asyncio tasks and requests in "
                                                   "flight (leak hunting)", False, _json("Counters"))},
            "/": {"get": {"operationId": "statusPage", "security": [],
                          "summary": "Status page (HTML): the headline figures",
                          "responses": {"200": {"description": "HTML", "content": {
                              "text/html": {"schema": {"type": "string"}}}}}}},
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())
