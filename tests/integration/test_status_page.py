"""The status page at ``/``: its HTML and figures, and a screenshot in headless Chromium.

The screenshot test installs Debian's ``chromium`` when it is missing (as root, like the
Makefile) and skips, saying why, only when that is impossible.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests  # type: ignore[import-untyped]

from proxy.report import Side, Summary
from proxy.status_page import CacheFill, render
from tests.prometheus_server import ensure_tool, install_failure

WIDTH, HEIGHT = 1200, 800


def ask(url: str, question: str, expect: str) -> None:
    resp = requests.post(url + "/v1/chat/completions", timeout=30, json={
        "model": "deepseek-chat", "messages": [{"role": "user", "content": question}]})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-semcache"] == expect


def wait_stored(url: str, n: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = requests.get(url + "/metrics", timeout=10).text
        stored = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("semcache_cache_store_total{"))
        if stored >= n:
            return
        time.sleep(0.02)
    raise AssertionError("answer not stored in time")


@pytest.fixture
def busy_proxy(make_proxy: Any, upstream: Any) -> str:
    _, upstream_url = upstream
    url: str = make_proxy(backends=[{"name": "deepseek", "base_url": upstream_url, "api_key_env": None}],
                          accounting={"prices_file": str(Path(__file__).resolve().parents[2] /
                                                         "config" / "prices.yaml")})
    ask(url, "What is the capital of Italy?", "miss")
    wait_stored(url, 1)
    ask(url, "What is the capital of Italy?", "exact")
    ask(url, "What is the capital of Italy?", "exact")
    ask(url, "How far is the Moon from the Earth?", "miss")
    wait_stored(url, 2)
    return url


def cards(page: str) -> dict[str, str]:
    return dict(re.findall(r'data-figure="([^"]+)"><h2>[^<]*</h2><p class="value">([^<]*)</p>', page))


def test_status_page_shows_the_headline_figures(busy_proxy: str) -> None:
    resp = requests.get(busy_proxy + "/", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.headers["cache-control"] == "no-store"
    page = resp.text
    figures = cards(page)
    assert figures["requests"] == "4"
    assert figures["hit ratio"] == "50.0%"
    assert figures["saved calls"] == "2"
    assert figures["cache entries"] == "2"
    # small figures keep three significant digits instead of rounding to zero
    assert re.fullmatch(r"\$0\.0000[1-9]\d\d", figures["saved USD"]), figures["saved USD"]
    assert re.fullmatch(r"0\.0[1-9]\d\d? Wh", figures["saved energy"]), figures["saved energy"]
    assert re.fullmatch(r"0\.00[1-9]\d\d g", figures["saved CO2"]), figures["saved CO2"]
    assert int(figures["saved tokens"].replace(",", "")) > 0
    assert '<meta http-equiv="refresh" content="10">' in page


def test_status_page_needs_nothing_from_outside(busy_proxy: str) -> None:
    page = requests.get(busy_proxy + "/", timeout=10).text
    assert "<script" not in page.lower()
    assert "<link" not in page.lower() and "<img" not in page.lower()
    assert "@import" not in page and "url(" not in page
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)


def test_status_page_escapes_and_handles_an_empty_proxy() -> None:
    page = render(Summary(), None, version="<b>v</b>")
    assert "&lt;b&gt;v&lt;/b&gt;" in page and "<b>v</b>" not in page
    figures = cards(page)
    assert figures["hit ratio"] == "–" and figures["requests"] == "0"
    full = render(Summary(requests=10, exact=3, semantic=1, misses=6,
                          saved=Side(calls=4, usd=0.5, joules=7200),
                          spent=Side(calls=6, usd=1.5, joules=3.6e6 * 2)),
                  CacheFill(entries=5, bytes=2**20, max_entries=10, max_bytes=2**30))
    figures = cards(full)
    assert figures["hit ratio"] == "40.0%" and figures["saved USD"] == "$0.500"
    assert figures["saved energy"] == "2.000 Wh"
    assert '<td>2.000 kWh</td>' in full          # spent energy in the table


# ------------------------------------------------------------------ screenshot


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """A tiny PNG decoder (8-bit RGB/RGBA, not interlaced): width, height and pixel rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    # RGB only: drop the alpha channel
    return width, height, [np.frombuffer(r, np.uint8).reshape(-1, bpp)[:, :3].tobytes() for r in rows]


def test_status_page_screenshot_in_headless_chromium(busy_proxy: str, tmp_path: Path) -> None:
    chromium = ensure_tool("chromium", "chromium")
    if chromium is None:
        pytest.skip(f"Debian's chromium is not available: {install_failure('chromium')}")
    shot = tmp_path / "status.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           f"--window-size={WIDTH},{HEIGHT}", busy_proxy + "/"]
    result = subprocess.run(cmd, capture_output=True, timeout=180)
    assert shot.exists(), result.stderr.decode(errors="replace")[-2000:]
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    colours = {row[i:i + 3] for row in rows[::4] for i in range(0, len(row), 12)}
    assert len(colours) > 20, f"the screenshot looks blank: {len(colours)} colours"
    # the header bar (#1d2733) is drawn across the top: the inline CSS was applied
    assert rows[10][30:33] == bytes.fromhex("1d2733")
    # and the green of the figures appears (#14633a values or #2e9e5b bars)
    assert any(bytes.fromhex(c) in colours for c in ("14633a", "2e9e5b")) or len(colours) > 100
