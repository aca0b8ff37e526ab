"""Slowest test modules first.

`make test` spreads whole modules over two pytest-xdist workers (`--dist loadfile`) in collection order
(`--no-loadscope-reorder`: xdist would otherwise sort them by test count, which puts the one-test
end-to-end modules — the slowest — last). A long module started last leaves the other worker idle
for its whole length, so modules are ordered longest first: by their time in the last run on this
machine (pytest's cache), else modules with `slow` tests before the rest.
"""

from __future__ import annotations

import os

import pytest

CACHE_KEY = "kd/module-seconds"
_seconds: dict[str, float] = {}  # module -> seconds in this run, summed on the controller


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last = config.cache.get(CACHE_KEY, {}) if config.cache is not None else {}
    slow = {_module(i.nodeid) for i in items if i.get_closest_marker("slow") is not None}
    # a stable sort: the tests of a module keep their order
    items.sort(key=lambda i: (-float(last.get(_module(i.nodeid), 0.0)), _module(i.nodeid) not in slow))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _seconds[_module(report.nodeid)] = _seconds.get(_module(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Record the run's module times (on the controller only: a worker saw half the modules); a run
    of a few modules updates theirs and keeps the others'."""
    cache = session.config.cache
    if cache is None or os.environ.get("PYTEST_XDIST_WORKER") or not _seconds:
        return
    cache.set(CACHE_KEY, {**cache.get(CACHE_KEY, {}), **{m: round(s, 1) for m, s in _seconds.items()}})
