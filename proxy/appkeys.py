"""Typed keys for what the composition root puts on the aiohttp application."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from .cache import SemanticCache
from .config import Config, Secrets
from .pipeline import Pipeline, Policy
from .ports import Metrics


@dataclass(slots=True)
class State:
    """Mutable runtime state shared by handlers: readiness and the reloadable policy."""

    config: Config
    policy: Policy
    ready: bool = False
    draining: bool = False
    in_flight: int = 0
    #: set whenever in_flight drops to zero; drain waits on it
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    notes: dict[str, str] = field(default_factory=dict)


CONFIG = web.AppKey("config", Config)
SECRETS = web.AppKey("secrets", Secrets)
STATE = web.AppKey("state", State)
PIPELINE = web.AppKey("pipeline", Pipeline)
CACHE: web.AppKey[SemanticCache | None] = web.AppKey("cache")
TENANT_SECRET = web.AppKey("tenant_secret", bytes)
#: the metrics port, for what is counted outside a route (the HTTP parser's refusals)
METRICS = web.AppKey("metrics", Metrics)
METRICS_TEXT: web.AppKey[Callable[[], bytes]] = web.AppKey("metrics_text")
#: how the request was answered (exact | semantic | miss | bypass | error | ...), for metrics
RESULT = web.RequestKey("result", str)
