"""Every module imports on its own, with warnings as errors: no hidden import-order coupling,
no work or deprecated calls at import time."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import proxy

MODULES = sorted(m.name for m in pkgutil.walk_packages(proxy.__path__, "proxy."))


def test_module_list_is_complete() -> None:
    assert {"proxy.app", "proxy.pipeline", "proxy.cachekey", "proxy.store.memory"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_imports_alone_without_warnings(module: str) -> None:
    result = subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
