"""Prometheus adapter for the ``Metrics`` port, over an injected registry.

Base units (seconds, tokens); every label value comes from a fixed set or from configuration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIMILARITY_BUCKETS = tuple(round(0.5 + i * 0.025, 3) for i in range(21))  # 0.5 .. 1.0
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

_ROUTES = frozenset({"chat", "completions", "models", "passthrough", "admin", "other"})


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class PrometheusMetrics:
    def __init__(self, registry: CollectorRegistry, backends: tuple[str, ...] = ()) -> None:
        self.registry = registry
        self._backends = frozenset(backends)
        p = "semcache_"
        self._requests = Counter(p + "requests_total", "HTTP requests served",
                                 ["route", "status_class"], registry=registry)
        self._duration = Histogram(p + "request_duration_seconds", "Time to the full response",
                                   ["route", "result"], buckets=LATENCY_BUCKETS, registry=registry)
        self._lookups = Counter(p + "cache_lookups_total", "Cache lookups by result",
                                ["result"], registry=registry)
        self._bypass = Counter(p + "cache_bypass_total", "Requests (partly) bypassing the cache",
                               ["reason"], registry=registry)
        self._similarity = Histogram(p + "cache_similarity", "Best similarity found per semantic lookup",
                                     ["outcome"], buckets=SIMILARITY_BUCKETS, registry=registry)
        self._ttft = Histogram(p + "time_to_first_token_seconds", "Time to the first streamed event",
                               ["result"], buckets=LATENCY_BUCKETS, registry=registry)
        self._tokens = Counter(p + "tokens_total", "Tokens spent (backend) and saved (cache)",
                               ["kind", "source"], registry=registry)
        self._cache_errors = Counter(p + "cache_errors_total", "Cache faults turned into misses",
                                     ["operation"], registry=registry)
        self._entries = Gauge(p + "cache_entries", "Entries in the cache", registry=registry)
        self._bytes = Gauge(p + "cache_bytes", "Bytes held by the cache", registry=registry)
        self._stored = Counter(p + "cache_store_total", "Answers offered to the cache by outcome",
                               ["outcome"], registry=registry)
        self._guards = Counter(p + "cache_guard_refusals_total",
                               "Semantic candidates above the threshold refused by a guard", ["guard"],
                               registry=registry)
        self._coalesced = Counter(p + "coalesced_requests_total",
                                  "Misses that shared an in-flight backend call", ["kind"],
                                  registry=registry)
        self._backend = Histogram(p + "backend_request_duration_seconds", "Backend time to headers",
                                  ["backend", "status_class"], buckets=LATENCY_BUCKETS, registry=registry)
        self._backend_errors = Counter(p + "backend_errors_total", "Backend calls that got no answer",
                                       ["backend", "kind"], registry=registry)
        self._embed = Histogram(p + "embedding_duration_seconds", "Model time per embedding batch",
                                buckets=LATENCY_BUCKETS, registry=registry)
        self._embed_batch = Histogram(p + "embedding_batch_size", "Texts per embedding batch",
                                      buckets=BATCH_BUCKETS, registry=registry)
        self._search = Histogram(p + "index_search_seconds", "Vector search time",
                                 buckets=LATENCY_BUCKETS, registry=registry)

    def request(self, route: str, status: int, result: str, seconds: float) -> None:
        route = route if route in _ROUTES else "other"
        self._requests.labels(route, _status_class(status)).inc()
        self._duration.labels(route, result).observe(seconds)

    def lookup(self, result: str) -> None:
        self._lookups.labels(result).inc()

    def bypass(self, reason: str) -> None:
        self._bypass.labels(reason).inc()

    def similarity(self, score: float, hit: bool) -> None:
        self._similarity.labels("hit" if hit else "miss").observe(score)

    def first_token(self, result: str, seconds: float) -> None:
        self._ttft.labels(result).observe(seconds)

    def tokens(self, usage: Mapping[str, Any], source: str) -> None:
        for kind in ("prompt_tokens", "completion_tokens"):
            value = usage.get(kind)
            if isinstance(value, int) and value > 0:
                self._tokens.labels(kind.removesuffix("_tokens"), source).inc(value)

    def cache_error(self, operation: str) -> None:
        self._cache_errors.labels(operation).inc()

    def cache_size(self, entries: int, size_bytes: int) -> None:
        self._entries.set(entries)
        self._bytes.set(size_bytes)

    def guard_refusal(self, guard: str) -> None:
        self._guards.labels(guard).inc()

    def coalesced(self, kind: str) -> None:
        self._coalesced.labels(kind).inc()

    def stored(self, outcome: str) -> None:
        self._stored.labels(outcome).inc()

    def backend(self, backend: str, status: int, seconds: float) -> None:
        self._backend.labels(self._backend_label(backend), _status_class(status)).observe(seconds)

    def backend_error(self, backend: str, kind: str) -> None:
        self._backend_errors.labels(self._backend_label(backend), kind).inc()

    def embedding_batch(self, size: int, seconds: float) -> None:
        self._embed.observe(seconds)
        self._embed_batch.observe(size)

    def index_search(self, seconds: float) -> None:
        self._search.observe(seconds)

    def _backend_label(self, name: str) -> str:
        return name if name in self._backends else "other"
