"""The status page served at ``/``: the headline figures for people without Grafana.

One self-contained HTML document (inline CSS, no scripts, fonts, images or other requests) that
reloads itself every ``refresh_s`` seconds. The figures are the savings report's
(:class:`proxy.report.Summary`), read from the proxy's own counters since it started.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from .report import Summary, fixed

REFRESH_S = 10


@dataclass(frozen=True, slots=True)
class CacheFill:
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _usd(value: float) -> str:
    return "$" + fixed(value, 2)


def _kwh(joules: float) -> str:
    kwh = joules / 3_600_000
    return f"{fixed(kwh * 1000, 3)} Wh" if kwh < 1 else f"{fixed(kwh, 3)} kWh"


def _co2(grams: float) -> str:
    return f"{fixed(grams, 2)} g" if grams < 1000 else f"{fixed(grams / 1000, 3)} kg"


def _mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _bar(share: float | None) -> str:
    width = 0.0 if share is None else max(0.0, min(1.0, share)) * 100
    return f'<div class="bar" role="img" aria-label="{_pct(share)}"><i style="width:{width:.1f}%"></i></div>'


def render(summary: Summary, fill: CacheFill | None, *, version: str = "",
           refresh_s: int = REFRESH_S) -> str:
    """The page as a string; every number comes from ``summary`` and ``fill``."""
    s, spent, saved = summary, summary.spent, summary.saved
    entries = fill.entries if fill is not None else (s.entries or 0)
    size = fill.bytes if fill is not None else (s.bytes or 0)
    cards = [
        ("requests", _n(s.requests), "chat + completions since start", None),
        ("hit ratio", _pct(s.hit_ratio), f"{_n(s.hits)} of {_n(s.lookups)} lookups "
         f"({_n(s.exact)} exact, {_n(s.semantic)} semantic)", s.hit_ratio),
        ("saved calls", _n(s.saved_calls), f"{_n(s.coalesced)} coalesced; {_n(spent.calls)} backend "
         "calls made", s.saved_share("calls")),
        ("saved tokens", _n(saved.tokens), f"{_n(saved.prompt_tokens)} prompt, "
         f"{_n(saved.completion_tokens)} completion", s.saved_share("tokens")),
        ("saved USD", _usd(saved.usd), f"spent {_usd(spent.usd)}", s.saved_share("usd")),
        ("saved energy", _kwh(saved.joules), f"spent {_kwh(spent.joules)}", s.saved_share("joules")),
        ("saved CO2", _co2(saved.co2_g), f"spent {_co2(spent.co2_g)}", s.saved_share("co2_g")),
        ("cache entries", _n(entries), _mib(size) + (
            f" of {_mib(fill.max_bytes)}; limit {_n(fill.max_entries)} entries" if fill else ""),
         (entries / fill.max_entries) if fill and fill.max_entries else None),
    ]
    items = []
    for title, value, detail, share in cards:
        bar = _bar(share) if share is not None else ""
        items.append(
            f'<section class="card" data-figure="{html.escape(title)}"><h2>{html.escape(title)}</h2>'
            f'<p class="value">{html.escape(value)}</p>{bar}'
            f'<p class="detail">{html.escape(detail)}</p></section>')
    rows = []
    for label, a, b, field in (
            ("calls", _n(spent.calls), _n(saved.calls), "calls"),
            ("tokens", _n(spent.tokens), _n(saved.tokens), "tokens"),
            ("USD", _usd(spent.usd), _usd(saved.usd), "usd"),
            ("energy", _kwh(spent.joules), _kwh(saved.joules), "joules"),
            ("CO2", _co2(spent.co2_g), _co2(saved.co2_g), "co2_g")):
        rows.append(f"<tr><th>{label}</th><td>{html.escape(a)}</td><td>{html.escape(b)}</td>"
                    f"<td>{_pct(s.saved_share(field))}</td></tr>")
    energy_note = ("Part of the spent energy is measured on the GPU (NVML); the rest is estimated"
                   if s.measured_joules else "Energy and CO2 are estimates")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{int(refresh_s)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>semcache-proxy status</title>
<style>
body{{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f6f8;color:#1d2733}}
header{{background:#1d2733;color:#fff;padding:14px 24px}}
header h1{{margin:0;font-size:20px}} header p{{margin:4px 0 0;color:#b7c3d0;font-size:13px}}
main{{padding:20px 24px;max-width:1200px}}
.cards{{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:14px}}
.card{{background:#fff;border-radius:8px;padding:12px 16px;box-shadow:0 1px 3px rgba(0,0,0,.12)}}
.card h2{{margin:0;font-size:13px;font-weight:600;color:#5b6b7c;text-transform:uppercase}}
.value{{font-size:28px;font-weight:700;margin:6px 0;color:#14633a}}
.detail{{font-size:12px;color:#5b6b7c;margin:6px 0 0}}
.bar{{height:8px;background:#e3e8ee;border-radius:4px;overflow:hidden}}
.bar i{{display:block;height:100%;background:#2e9e5b}}
table{{border-collapse:collapse;margin-top:22px;background:#fff;box-shadow:0 1px 3px rgba(0,0,0,.12)}}
th,td{{padding:6px 16px;text-align:right;font-size:14px;border-bottom:1px solid #e3e8ee}}
th{{text-align:left}} thead th{{background:#e9eef3;text-align:right}} thead th:first-child{{text-align:left}}
footer{{font-size:12px;color:#5b6b7c;margin-top:16px}}
</style></head>
<body><header><h1>semcache-proxy</h1>
<p>What the cache saved since the proxy started. This page reloads every {int(refresh_s)} s;
Prometheus metrics at <code>/metrics</code>.</p></header>
<main><div class="cards">
{chr(10).join(items)}
</div>
<table><thead><tr><th></th><th>spent</th><th>saved</th><th>saved share</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<footer>Spent: calls made to backends. Saved: requests answered from the cache or by sharing
another request's call, valued at the answer's own usage. {html.escape(energy_note)}
(docs/accounting.md). {html.escape(version)}</footer>
</main></body></html>
"""
