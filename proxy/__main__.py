"""Command line: ``python -m proxy serve|cache|calibrate|replay ...``."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_CONFIG = "config/proxy.yaml"
DEFAULT_URL = "http://127.0.0.1:8080"


def _admin_call(url: str, method: str, token: str | None) -> dict[str, object]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy", description="semcache-proxy")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default=DEFAULT_CONFIG)
    cache = sub.add_parser("cache", help="inspect or flush a running proxy's cache")
    cache.add_argument("action", choices=["stats", "flush"])
    cache.add_argument("--url", default=DEFAULT_URL, help="base URL of the running proxy")
    cache.add_argument("--token", default=None, help="admin token (if the proxy has one)")
    calibrate = sub.add_parser("calibrate", help="measure false hits and recall per threshold on "
                               "labelled pairs", description="Embed labelled pairs with the proxy's "
                               "model and print precision, recall and false-hit rate per threshold.")
    replay = sub.add_parser("replay", help="replay a prompt workload through the cache logic (no backend)",
                            description="Replay prompts through the cache (real model and index, "
                            "answers synthesised) and report hit ratio, saved calls and tokens.")
    from . import calibrate as calibrate_command
    from . import replay as replay_command

    calibrate_command.add_arguments(calibrate)
    replay_command.add_arguments(replay)
    report = sub.add_parser("report", help="print what the cache saved: calls, tokens, USD, kWh, CO2",
                            description="Savings report from a running proxy's /metrics (since it "
                            "started) or from Prometheus (increase over --window).")
    from . import report as report_command

    report_command.add_arguments(report, DEFAULT_URL)
    args = parser.parse_args(argv)

    if args.command == "report":
        return report_command.run(args, DEFAULT_URL)

    if args.command in ("calibrate", "replay"):
        import asyncio

        from .config import ConfigError

        run_command = calibrate_command.run if args.command == "calibrate" else replay_command.run
        try:
            return asyncio.run(run_command(args))
        except (ConfigError, OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command == "serve":
        from .app import run
        from .config import ConfigError
        try:
            run(args.config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    method, path = ("GET", "/admin/cache/stats") if args.action == "stats" else ("POST", "/admin/cache/flush")
    try:
        result = _admin_call(args.url.rstrip("/") + path, method, args.token)
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach the proxy at {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
