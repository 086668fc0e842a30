"""Prometheus adapter for the ``Metrics`` port, over an injected registry.

Base units (seconds, tokens); every label value comes from a fixed set or from configuration.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .accounting import Account

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SIMILARITY_BUCKETS = tuple(round(0.5 + i * 0.025, 3) for i in range(21))  # 0.5 .. 1.0
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

_BREAKER_STATES = ("closed", "open", "half_open")
_ROUTES = frozenset({"chat", "completions", "models", "passthrough", "admin", "other"})


class _Family:
    """A labelled metric whose children are looked up once: ``MetricWrapperBase.labels``
    validates and locks on every call, a few microseconds that show on the hit path. The label
    values are bounded (fixed sets or configuration), so the dict is too."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


def _status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class PrometheusMetrics:
    def __init__(self, registry: CollectorRegistry, backends: tuple[str, ...] = ()) -> None:
        self.registry = registry
        self._backends = frozenset(backends)
        p = "semcache_"
        self._requests = _Family(Counter(p + "requests_total", "HTTP requests served",
                                 ["route", "status_class"], registry=registry))
        self._duration = _Family(Histogram(p + "request_duration_seconds", "Time to the full response",
                                   ["route", "result"], buckets=LATENCY_BUCKETS, registry=registry))
        self._lookups = _Family(Counter(p + "cache_lookups_total", "Cache lookups by result",
                                ["result"], registry=registry))
        self._bypass = _Family(Counter(p + "cache_bypass_total", "Requests (partly) bypassing the cache",
                               ["reason"], registry=registry))
        self._similarity = _Family(Histogram(
            p + "cache_similarity", "Best similarity found per semantic lookup",
                                     ["outcome"], buckets=SIMILARITY_BUCKETS, registry=registry))
        self._ttft = _Family(Histogram(p + "time_to_first_token_seconds", "Time to the first streamed event",
                               ["result"], buckets=LATENCY_BUCKETS, registry=registry))
        self._tokens = _Family(Counter(p + "tokens_total", "Tokens spent (backend) and saved (cache)",
                               ["kind", "source"], registry=registry))
        self._usd = _Family(Counter(p + "cost_usd_total", "USD at the model's token prices: spent or saved",
                            ["source"], registry=registry))
        self._unpriced = _Family(Counter(p + "unpriced_answers_total",
                                 "Answers whose model has no price in prices.yaml", ["source"],
                                 registry=registry))
        self._joules = _Family(Counter(
            p + "energy_joules_total", "Estimated or measured energy, PUE included",
                               ["source", "method"], registry=registry))
        self._co2 = _Family(Counter(p + "co2_grams_total", "Grams CO2e of that energy", ["source"],
                            registry=registry))
        self._cache_errors = _Family(Counter(p + "cache_errors_total", "Cache faults turned into misses",
                                     ["operation"], registry=registry))
        self._entries = Gauge(p + "cache_entries", "Entries in the cache", registry=registry)
        self._bytes = Gauge(p + "cache_bytes", "Bytes held by the cache", registry=registry)
        self._stored = _Family(Counter(p + "cache_store_total", "Answers offered to the cache by outcome",
                               ["outcome"], registry=registry))
        self._guards = _Family(Counter(p + "cache_guard_refusals_total",
                               "Semantic candidates above the threshold refused by a guard", ["guard"],
                               registry=registry))
        self._feedback = _Family(Counter(p + "cache_feedback_total",
                                 "Served answers marked wrong, their entries evicted (explicit: admin "
                                 "call; retry: a no-cache retry right after a semantic hit)", ["kind"],
                                 registry=registry))
        for kind in ("explicit", "retry"):  # both series from the start, so rates work at once
            self._feedback.labels(kind)
        self._coalesced = _Family(Counter(p + "coalesced_requests_total",
                                  "Misses that shared an in-flight backend call", ["kind"],
                                  registry=registry))
        self._backend = _Family(Histogram(p + "backend_request_duration_seconds", "Backend time to headers",
                                  ["backend", "status_class"], buckets=LATENCY_BUCKETS, registry=registry))
        self._backend_errors = _Family(Counter(p + "backend_errors_total", "Backend calls that got no answer",
                                       ["backend", "kind"], registry=registry))
        self._backend_up = Gauge(p + "backend_up", "1 when the backend's circuit breaker is closed",
                                 ["backend"], registry=registry)
        self._breaker = Gauge(p + "backend_breaker_state", "Circuit breaker state, one-hot",
                              ["backend", "state"], registry=registry)
        self._retries = _Family(Counter(
            p + "retries_total", "Backend attempts tried again before the first byte",
                                ["backend", "reason"], registry=registry))
        self._failovers = _Family(Counter(p + "failovers_total", "Requests that moved on from this backend",
                                  ["backend"], registry=registry))
        self._embed = Histogram(p + "embedding_duration_seconds", "Model time per embedding batch",
                                buckets=LATENCY_BUCKETS, registry=registry)
        self._embed_batch = Histogram(p + "embedding_batch_size", "Texts per embedding batch",
                                      buckets=BATCH_BUCKETS, registry=registry)
        self._batch = _Family(Histogram(p + "batch_size", "Requests per flushed batch", ["backend"],
                                buckets=BATCH_BUCKETS, registry=registry))
        self._batch_wait = _Family(Histogram(
            p + "batch_wait_seconds", "Time the oldest request of a batch waited",
                                     ["backend"], buckets=LATENCY_BUCKETS, registry=registry))
        self._queue = _Family(Gauge(p + "queue_depth", "Requests queued per backend (window or free slot)",
                            ["backend"], registry=registry))
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

    def usage(self, account: Account, source: str) -> None:
        if account.tokens_prompt:
            self._tokens.labels("prompt", source).inc(account.tokens_prompt)
        if account.tokens_completion:
            self._tokens.labels("completion", source).inc(account.tokens_completion)
        if account.usd is not None:
            self._usd.labels(source).inc(account.usd)
        else:
            self._unpriced.labels(source).inc()
        if account.joules:
            self._joules.labels(source, account.method or "estimated").inc(account.joules)
        if account.co2_g:
            self._co2.labels(source).inc(account.co2_g)

    def cache_error(self, operation: str) -> None:
        self._cache_errors.labels(operation).inc()

    def cache_size(self, entries: int, size_bytes: int) -> None:
        self._entries.set(entries)
        self._bytes.set(size_bytes)

    def guard_refusal(self, guard: str) -> None:
        self._guards.labels(guard).inc()

    def feedback(self, kind: str) -> None:
        self._feedback.labels(kind if kind in ("explicit", "retry") else "other").inc()

    def coalesced(self, kind: str) -> None:
        self._coalesced.labels(kind).inc()

    def stored(self, outcome: str) -> None:
        self._stored.labels(outcome).inc()

    def backend(self, backend: str, status: int, seconds: float) -> None:
        self._backend.labels(self._backend_label(backend), _status_class(status)).observe(seconds)

    def backend_error(self, backend: str, kind: str) -> None:
        self._backend_errors.labels(self._backend_label(backend), kind).inc()

    def backend_state(self, backend: str, state: str) -> None:
        label = self._backend_label(backend)
        self._backend_up.labels(label).set(1 if state == "closed" else 0)
        for name in _BREAKER_STATES:
            self._breaker.labels(label, name).set(1 if name == state else 0)

    def retry(self, backend: str, reason: str) -> None:
        self._retries.labels(self._backend_label(backend), reason).inc()

    def failover(self, backend: str) -> None:
        self._failovers.labels(self._backend_label(backend)).inc()

    def batch(self, backend: str, size: int, wait_s: float) -> None:
        label = self._backend_label(backend)
        self._batch.labels(label).observe(size)
        self._batch_wait.labels(label).observe(wait_s)

    def queue_depth(self, backend: str, n: int) -> None:
        self._queue.labels(self._backend_label(backend)).set(n)

    def embedding_batch(self, size: int, seconds: float) -> None:
        self._embed.observe(seconds)
        self._embed_batch.observe(size)

    def index_search(self, seconds: float) -> None:
        self._search.observe(seconds)

    def _backend_label(self, name: str) -> str:
        return name if name in self._backends else "other"
