"""Composition root: the only place that builds concrete objects and wires them together.

Each resource gets its own cleanup_ctx so it is opened in order and closed in reverse, also when
start-up fails half way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from .accounting import PriceTable, parse_prices
from .appkeys import CACHE, CONFIG, METRICS_TEXT, PIPELINE, SECRETS, STATE, TENANT_SECRET, State
from .backends.openai import OpenAIBackend
from .cache import CacheSettings, SemanticCache
from .cachekey import Rules
from .clock import SystemClock
from .config import Config, ConfigError, load_config, resolve_secrets
from .embedding import SentenceEmbedder
from .guards import Guards
from .index import FaissIndex
from .metrics import PrometheusMetrics
from .middleware import make_middleware
from .pipeline import Pipeline, Policy
from .ports import Backend, Embedder
from .routes import setup_routes
from .store.memory import MemoryStore
from .tasks import TaskTracker

log = logging.getLogger(__name__)


def load_prices(path: str) -> PriceTable:
    try:
        return parse_prices(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        log.warning("no price table (%s): costs are reported as unpriced", exc)
    except ValueError as exc:
        raise ConfigError(f"invalid price table {path}: {exc}") from exc
    return PriceTable()


def make_policy(config: Config) -> Policy:
    rules = Rules(scripts=frozenset(config.embedding.scripts),
                  min_script_share=config.embedding.min_script_share,
                  semantic=config.cache.semantic)
    return Policy(cache=config.cache, rules=rules, guards=Guards.only(*config.cache.guards))


def tenant_secret(data_dir: str) -> bytes:
    """The key for hashing client credentials into tenants; kept in the data dir so tenants
    stay the same across restarts (and the snapshot stays usable)."""
    if not data_dir:
        return secrets.token_bytes(32)
    path = Path(data_dir) / "tenant.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex())
    os.replace(tmp, path)
    return key


@dataclass
class Overrides:
    """Pre-built adapters a caller (tests, benchmarks) may hand in; the app then does not own them."""

    embedder: Embedder | None = None


def build_app(config: Config, *, environ: Mapping[str, str] | None = None,
              config_path: str | None = None, overrides: Overrides | None = None) -> web.Application:
    environ = os.environ if environ is None else environ
    overrides = overrides or Overrides()
    registry = CollectorRegistry(auto_describe=True)
    metrics = PrometheusMetrics(registry, backends=tuple(b.name for b in config.backends))
    clock = SystemClock()
    app = web.Application(middlewares=[make_middleware(metrics)],
                          client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[SECRETS] = resolve_secrets(config, environ)
    app[STATE] = State(config=config, policy=make_policy(config))
    app[METRICS_TEXT] = lambda: generate_latest(registry)
    app[TENANT_SECRET] = tenant_secret(config.store.data_dir)
    tasks = TaskTracker()

    backends: dict[str, Backend] = {
        b.name: OpenAIBackend(b, app[SECRETS].backend_keys.get(b.name)) for b in config.backends}

    def route_backend(model: str) -> Backend:
        return backends[config.backend_for(model).name]

    embedder: Embedder | None = overrides.embedder
    own_embedder = embedder is None and config.cache.enabled and config.cache.semantic
    if own_embedder:
        embedder = SentenceEmbedder(config.embedding, on_batch=metrics.embedding_batch)
    cache: SemanticCache | None = None
    store: MemoryStore | None = None
    index: FaissIndex | None = None
    if config.cache.enabled:
        store = MemoryStore(max_entries=config.cache.max_entries, max_bytes=config.cache.max_bytes,
                            data_dir=config.store.data_dir,
                            snapshot_interval_s=config.store.snapshot_interval_s, clock=clock)
        index = FaissIndex(on_search=metrics.index_search)
        cache = SemanticCache(store=store, index=index, embedder=embedder, clock=clock, metrics=metrics,
                              settings=CacheSettings(
                                  ttl_s=config.cache.ttl_s, top_k=config.cache.top_k,
                                  max_entry_bytes=config.cache.max_entry_bytes,
                                  store_finish_reasons=frozenset(config.cache.store_finish_reasons),
                                  lookup_timeout_s=config.cache.lookup_timeout_s))
    app[CACHE] = cache
    state = app[STATE]
    app[PIPELINE] = Pipeline(cache=cache, route_backend=route_backend, metrics=metrics, clock=clock,
                             policy=lambda: state.policy, tasks=tasks,
                             prices=load_prices(config.accounting.prices_file))

    async def backends_ctx(_: web.Application) -> AsyncIterator[None]:
        for backend in backends.values():
            await backend.start()
        yield
        for backend in backends.values():
            await backend.close()

    async def embedder_ctx(_: web.Application) -> AsyncIterator[None]:
        if own_embedder and embedder is not None:
            await embedder.start()
        yield
        if own_embedder and embedder is not None:
            await embedder.close()

    async def cache_ctx(_: web.Application) -> AsyncIterator[None]:
        if store is None or index is None or cache is None:
            yield
            return
        await store.start()
        loaded = await cache.rebuild_index()
        log.info("cache ready: %d vectors indexed", loaded)
        yield
        await store.close()
        await index.close()

    async def tasks_ctx(_: web.Application) -> AsyncIterator[None]:
        yield
        await tasks.join(grace=config.server.drain_timeout_s)

    async def lifecycle_ctx(_: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        reload = _reloader(state, config_path)
        with _signal(loop, signal.SIGHUP, reload):
            state.ready = True
            yield
            state.ready = False

    async def on_shutdown(_: web.Application) -> None:
        # readiness goes off at once so load balancers stop sending while we drain
        state.draining = True

    app.cleanup_ctx.extend([backends_ctx, embedder_ctx, cache_ctx, tasks_ctx, lifecycle_ctx])
    app.on_shutdown.append(on_shutdown)
    setup_routes(app)
    return app


def _reloader(state: State, config_path: str | None) -> Callable[[], None]:
    def reload() -> None:
        if config_path is None:
            log.warning("SIGHUP ignored: no config file to reload")
            return
        try:
            fresh = load_config(config_path)
        except ConfigError as exc:
            log.error("config reload failed, keeping the running config: %s", exc)
            return
        # only the per-request policy is swapped; a request in flight keeps the policy it read
        state.policy = make_policy(fresh)
        restart_needed = fresh.model_copy(update={"cache": state.config.cache}) != state.config
        log.info("config reloaded: thresholds and cache rules applied%s",
                 "; other changes need a restart" if restart_needed else "")

    return reload


class _signal:
    def __init__(self, loop: asyncio.AbstractEventLoop, signum: int, callback: Callable[[], None]) -> None:
        self._loop, self._signum, self._callback = loop, signum, callback
        self._installed = False

    def __enter__(self) -> None:
        try:
            self._loop.add_signal_handler(self._signum, self._callback)
            self._installed = True
        except (NotImplementedError, RuntimeError, ValueError):
            # not the main thread (tests run the app in-process) or no signals on this platform
            self._installed = False

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            self._loop.remove_signal_handler(self._signum)


def run(config_path: str, environ: Mapping[str, str] | None = None) -> None:
    config = load_config(config_path)
    logging.basicConfig(level=config.server.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.server.uvloop:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            log.info("uvloop not installed; using the default event loop")
    app = build_app(config, environ=environ, config_path=config_path)
    web.run_app(app, host=config.server.host, port=config.server.port,
                shutdown_timeout=config.server.drain_timeout_s, access_log=None,
                # a client that hangs up cancels its handler, so a flight nobody waits for stops
                handler_cancellation=True,
                print=lambda msg: log.info("%s", msg.strip()))
