"""Progress reporting without a UI dependency: kd_core calls plain callbacks, the CLI draws them.

Long loops (`logits.build_cache`, `train.fit`) take an optional `progress(done, total)` callback.
Stages ask `bar(description, unit)` for one; it is None (no overhead, no output) unless a front end
installed a `Reporter` with `reporting(...)` — `kd stage` installs a rich one on a terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

Progress = Callable[[int, int], None]  # progress(done, total), in the bar's unit (rows, steps…)


class Reporter(Protocol):
    """A front end that draws bars: one new bar per `task` call."""

    def task(self, description: str, unit: str) -> Progress: ...


_reporter: ContextVar[Reporter | None] = ContextVar("kd_progress_reporter", default=None)


def bar(description: str, unit: str = "rows") -> Progress | None:
    """A callback for one loop, or None when nobody is watching (then callers skip the calls)."""
    reporter = _reporter.get()
    return reporter.task(description, unit) if reporter is not None else None


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Install `reporter` for the calls inside the block (None: no bars)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)
