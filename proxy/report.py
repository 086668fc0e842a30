"""The savings report: what the cache saved and what the backends cost, from the proxy's counters.

``python -m proxy report`` reads either a running proxy's ``/metrics`` (totals since it started)
or a Prometheus server (``increase()`` over a window, summed over every scraped replica), and
prints saved calls, tokens, USD, kWh, grams CO2 and the hit ratio, spent against saved. With
``--png`` it also draws a chart (needs matplotlib: ``pip install 'semcache-proxy[report]'``).

Every figure is a sum of counters defined in docs/operations.md ("Metrics"):

* hit ratio = (exact + semantic lookups) / all lookups (bypass included): the share of completion
  requests answered from the cache;
* saved calls = exact + semantic hits + coalesced requests (requests that shared another's call);
* spent = ``source="backend"``, saved = ``source="cache"`` + ``source="coalesced"``.

The status page at ``/`` shows the same :class:`Summary`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from .accounting import kwh

P = "semcache_"
SAVED_SOURCES = ("cache", "coalesced")
#: a Prometheus duration: 1h, 30m, 7d, 1h30m ...
WINDOW = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


class Sample(NamedTuple):
    name: str                    # as exposed: counters end in _total, histograms in _count ...
    labels: Mapping[str, str]
    value: float


#: (sample name, labels kept) for every series the summary reads; gauges are marked
SERIES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    (P + "requests_total", ("route", "status_class"), False),
    (P + "cache_lookups_total", ("result",), False),
    (P + "coalesced_requests_total", ("kind",), False),
    (P + "backend_request_duration_seconds_count", ("backend",), False),
    (P + "tokens_total", ("kind", "source"), False),
    (P + "cost_usd_total", ("source",), False),
    (P + "unpriced_answers_total", ("source",), False),
    (P + "energy_joules_total", ("source", "method"), False),
    (P + "co2_grams_total", ("source",), False),
    (P + "cache_entries", (), True),
    (P + "cache_bytes", (), True),
)


@dataclass(frozen=True, slots=True)
class Side:
    """Spent or saved: what backend calls cost, or what the avoided calls would have cost."""

    calls: float = 0.0
    prompt_tokens: float = 0.0
    completion_tokens: float = 0.0
    usd: float = 0.0
    joules: float = 0.0
    co2_g: float = 0.0
    unpriced: float = 0.0       # answers whose model has no price (not in usd)

    @property
    def tokens(self) -> float:
        return self.prompt_tokens + self.completion_tokens

    @property
    def kwh(self) -> float:
        return kwh(self.joules)


@dataclass(frozen=True, slots=True)
class Summary:
    requests: float = 0.0             # chat + completions requests, any status
    exact: float = 0.0
    semantic: float = 0.0
    misses: float = 0.0
    bypassed: float = 0.0
    coalesced: float = 0.0
    spent: Side = Side()
    saved: Side = Side()
    measured_joules: float = 0.0      # of spent joules, those measured by NVML
    entries: float | None = None
    bytes: float | None = None

    @property
    def hits(self) -> float:
        return self.exact + self.semantic

    @property
    def lookups(self) -> float:
        return self.exact + self.semantic + self.misses + self.bypassed

    @property
    def hit_ratio(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None

    @property
    def saved_calls(self) -> float:
        return self.hits + self.coalesced

    def saved_share(self, field: str) -> float | None:
        """saved / (spent + saved) for one of Side's figures (``calls``, ``usd``, ``kwh`` ...)."""
        spent, saved = getattr(self.spent, field), getattr(self.saved, field)
        return saved / (spent + saved) if spent + saved else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(hits=self.hits, lookups=self.lookups, hit_ratio=self.hit_ratio,
                    saved_calls=self.saved_calls)
        for side in ("spent", "saved"):
            part: Side = getattr(self, side)
            data[side].update(tokens=part.tokens, kwh=part.kwh)
        return data


# --------------------------------------------------------------------------- sources


def parse_exposition(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (a proxy's ``/metrics``)."""
    samples = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.append(Sample(sample.name, dict(sample.labels), float(sample.value)))
    return samples


def _sum(samples: Iterable[Sample], name: str, **labels: str | tuple[str, ...]) -> float:
    total = 0.0
    for sample in samples:
        if sample.name != name:
            continue
        if all(sample.labels.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in labels.items()):
            total += sample.value
    return total


def _gauge(samples: Sequence[Sample], name: str) -> float | None:
    values = [s.value for s in samples if s.name == name]
    return sum(values) if values else None


def summarize(samples: Sequence[Sample]) -> Summary:
    def side(source: str | tuple[str, ...], calls: float) -> Side:
        return Side(
            calls=calls,
            prompt_tokens=_sum(samples, P + "tokens_total", kind="prompt", source=source),
            completion_tokens=_sum(samples, P + "tokens_total", kind="completion", source=source),
            usd=_sum(samples, P + "cost_usd_total", source=source),
            joules=_sum(samples, P + "energy_joules_total", source=source),
            co2_g=_sum(samples, P + "co2_grams_total", source=source),
            unpriced=_sum(samples, P + "unpriced_answers_total", source=source))

    lookups = P + "cache_lookups_total"
    exact, semantic = _sum(samples, lookups, result="exact"), _sum(samples, lookups, result="semantic")
    coalesced = _sum(samples, P + "coalesced_requests_total")
    return Summary(
        requests=_sum(samples, P + "requests_total", route=("chat", "completions")),
        exact=exact, semantic=semantic,
        misses=_sum(samples, lookups, result="miss"),
        bypassed=_sum(samples, lookups, result="bypass"),
        coalesced=coalesced,
        spent=side("backend", _sum(samples, P + "backend_request_duration_seconds_count")),
        saved=side(SAVED_SOURCES, exact + semantic + coalesced),
        measured_joules=_sum(samples, P + "energy_joules_total", source="backend", method="measured"),
        entries=_gauge(samples, P + "cache_entries"),
        bytes=_gauge(samples, P + "cache_bytes"))


class ReportError(Exception):
    pass


def _get(url: str, timeout: float, token: str | None = None) -> bytes:
    # with server.metrics_token_env set, the proxy's /metrics wants this bearer token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise ReportError(f"{url}: HTTP {exc.code} {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ReportError(f"cannot reach {url}: {exc}") from exc


def from_proxy(url: str, timeout: float = 10.0, token: str | None = None) -> Summary:
    """Totals since the proxy started, from its ``/metrics``."""
    text = _get(url.rstrip("/") + "/metrics", timeout, token).decode("utf-8", errors="replace")
    try:
        return summarize(parse_exposition(text))
    except ValueError as exc:
        raise ReportError(f"{url}/metrics is not a Prometheus exposition: {exc}") from exc


def prometheus_queries(window: str, selector: str = "") -> dict[str, tuple[str, tuple[str, ...]]]:
    """sample name -> (PromQL, labels) that the Prometheus source asks for."""
    if not WINDOW.match(window):
        raise ReportError(f"window {window!r} is not a Prometheus duration (e.g. 1h, 30m, 7d)")
    matchers = "{" + selector + "}" if selector else ""
    queries = {}
    for name, labels, gauge in SERIES:
        by = f" by ({', '.join(labels)})" if labels else ""
        inner = f"{name}{matchers}" if gauge else f"increase({name}{matchers}[{window}])"
        queries[name] = (f"sum{by} ({inner})", labels)
    return queries


def from_prometheus(url: str, window: str, selector: str = "", timeout: float = 30.0) -> Summary:
    """Increases over ``window`` up to now, summed over every series ``selector`` matches."""
    samples: list[Sample] = []
    for name, (query, labels) in prometheus_queries(window, selector).items():
        endpoint = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
        try:
            answer = json.loads(_get(endpoint, timeout))
        except ValueError as exc:
            raise ReportError(f"{url} did not answer JSON: {exc}") from exc
        if answer.get("status") != "success":
            raise ReportError(f"Prometheus refused {query!r}: {answer.get('error')}")
        for item in answer["data"]["result"]:
            metric = item.get("metric", {})
            value = float(item["value"][1])
            if value == value:  # drop NaN
                samples.append(Sample(name, {k: metric[k] for k in labels if k in metric}, value))
    return summarize(samples)


# --------------------------------------------------------------------------- output


def _num(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def fixed(value: float, decimals: int = 2) -> str:
    """At least ``decimals`` decimals, more for small values so that 3 significant digits show
    (a saved $0.0000238 must not print as $0.0000)."""
    if value > 0:
        decimals = min(8, max(decimals, 2 - math.floor(math.log10(value))))
    return f"{value:,.{decimals}f}"


def size(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_text(summary: Summary, source: str) -> str:
    s, spent, saved = summary, summary.spent, summary.saved
    lines = [
        f"semcache-proxy savings report: {source}",
        "",
        f"requests (chat + completions)  {_num(s.requests)}",
        f"answered from the cache        {_num(s.hits)}  (exact {_num(s.exact)}, "
        f"semantic {_num(s.semantic)})",
        f"hit ratio                      {_pct(s.hit_ratio)}  (of {_num(s.lookups)} lookups; "
        f"{_num(s.misses)} misses, {_num(s.bypassed)} bypassed)",
        f"coalesced into another call    {_num(s.coalesced)}",
    ]
    if s.entries is not None:
        held = f", {size(s.bytes)}" if s.bytes is not None else ""
        lines.append(f"cache entries                  {_num(s.entries)}{held}")
    rows = [
        ("calls", _num(spent.calls), _num(saved.calls), "calls"),
        ("prompt tokens", _num(spent.prompt_tokens), _num(saved.prompt_tokens), "prompt_tokens"),
        ("completion tokens", _num(spent.completion_tokens), _num(saved.completion_tokens),
         "completion_tokens"),
        ("cost USD", "$" + fixed(spent.usd, 4), "$" + fixed(saved.usd, 4), "usd"),
        ("energy kWh", fixed(spent.kwh, 6), fixed(saved.kwh, 6), "kwh"),
        ("CO2 grams", fixed(spent.co2_g, 3), fixed(saved.co2_g, 3), "co2_g"),
    ]
    lines += ["", f"{'':20}{'spent':>16}{'saved':>16}{'saved share':>14}"]
    for label, a, b, field in rows:
        lines.append(f"{label:20}{a:>16}{b:>16}{_pct(s.saved_share(field)):>14}")
    notes = []
    if spent.unpriced or saved.unpriced:
        notes.append(f"{_num(spent.unpriced)} spent and {_num(saved.unpriced)} saved answers are of "
                     "models without a price (config/prices.yaml): not in the USD figures.")
    if s.measured_joules:
        notes.append(f"{kwh(s.measured_joules):,.6f} kWh of the spent energy was measured (NVML); "
                     "the rest is estimated (docs/accounting.md).")
    else:
        notes.append("Energy and CO2 are estimates (docs/accounting.md).")
    return "\n".join([*lines, "", *notes]) + "\n"


def write_png(summary: Summary, path: str, title: str) -> bool:
    """Draw spent vs saved per figure; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figures = [("calls", "calls"), ("tokens", "tokens"), ("USD", "usd"), ("kWh", "kwh"),
               ("grams CO2", "co2_g")]
    fig, axes = plt.subplots(1, len(figures), figsize=(12, 3.6))
    for ax, (label, field) in zip(axes, figures, strict=True):
        values = [getattr(summary.spent, field), getattr(summary.saved, field)]
        bars = ax.bar(["spent", "saved"], values, color=["#d9534f", "#2e9e5b"])
        ax.set_title(label)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=8)
        ax.margins(y=0.2)
        ax.tick_params(axis="y", labelsize=7)
    ratio = _pct(summary.hit_ratio)
    fig.suptitle(f"{title}  (hit ratio {ratio}, saved calls {summary.saved_calls:,.0f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, default_url: str) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None,
                       help=f"a running proxy: totals since it started (default {default_url})")
    where.add_argument("--prometheus", default=None, metavar="URL",
                       help="a Prometheus server scraping the proxy: increase() over --window")
    parser.add_argument("--window", default="1h", help="Prometheus window, e.g. 1h, 24h, 7d (default 1h)")
    parser.add_argument("--selector", default="",
                        help='extra PromQL label matchers for --prometheus, e.g. job="semcache"')
    parser.add_argument("--png", default=None, metavar="FILE", help="also write a chart (matplotlib)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP call")
    parser.add_argument("--token-env", default="SEMCACHE_METRICS_TOKEN", metavar="NAME",
                        help="environment variable holding the proxy's metrics token, sent as a "
                             "bearer token with --url when set (default SEMCACHE_METRICS_TOKEN)")


def run(args: argparse.Namespace, default_url: str) -> int:
    try:
        if args.prometheus:
            summary = from_prometheus(args.prometheus, args.window, args.selector, args.timeout)
            source = f"{args.prometheus}, last {args.window}"
        else:
            url = args.url or default_url
            summary = from_proxy(url, args.timeout, os.environ.get(args.token_env) or None)
            source = f"{url}, since the proxy started"
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"source": source, **summary.as_dict()}, indent=2))
    else:
        print(format_text(summary, source), end="")
    if args.png:
        if write_png(summary, args.png, f"semcache-proxy: {source}"):
            print(f"chart written to {args.png}", file=sys.stderr)
        else:
            print("no chart: matplotlib is not installed (pip install 'semcache-proxy[report]')",
                  file=sys.stderr)
    return 0
