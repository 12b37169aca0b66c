"""Repository-wide pytest hooks (loaded for every pytest run in this checkout)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    # pyproject's addopts passes --benchmark-disable; without pytest-benchmark (an optional test dependency, absent
    # on the GPU machine's image) pytest would exit 4 on the unknown option, so accept it as a no-op then
    if not (pluginmanager.hasplugin("benchmark") or pluginmanager.hasplugin("pytest_benchmark.plugin")):
        parser.addoption("--benchmark-disable", action="store_true", help="no-op: pytest-benchmark is not installed")
