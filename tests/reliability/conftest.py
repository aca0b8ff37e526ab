"""The reliability figure, counted by the suite itself rather than written by hand:

    "N of N bad-input classes rejected, M of M faults survived, 0 models wrongly registered, 0 bytes lost"

A test says what it attacks with a marker: `@pytest.mark.fault("name")`, or `@pytest.mark.bad_input`
(the case is the test's parameter id). It counts as rejected/survived only when every phase of it
passed, so a failing test shows as a failure in the figure and is never counted. The two damage
figures are measurements the tests record through the `tally` fixture before they assert, so damage
shows in the figure even when it also fails the test. Printed at the end of the run and written to
reports/reliability.txt (gitignored).
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ROOT

KINDS = {"bad_input": "bad-input classes rejected", "fault": "faults survived"}
REPORT = ROOT / "reports" / "reliability.txt"
Snapshot = dict[str, tuple[str, int]]  # path -> (sha256, size)


@dataclass
class Tally:
    """Outcomes per case (kind -> case -> passed?), and the damage measured along the way."""

    outcomes: dict[str, dict[str, bool]] = field(default_factory=lambda: {k: {} for k in KINDS})
    details: dict[str, str] = field(default_factory=dict)  # case -> its one-line outcome
    registered: int = 0  # model versions created where none should have been
    bytes_lost: int = 0  # bytes of earlier artifacts changed or gone after a fault

    def wrongly_registered(self, versions: int) -> None:
        self.registered += max(versions, 0)

    def lost(self, nbytes: int) -> None:
        self.bytes_lost += nbytes

    def figure(self) -> str:
        counts = []
        for kind, words in KINDS.items():
            done = self.outcomes[kind]
            failed = sorted(case for case, ok in done.items() if not ok)
            counts.append(f"{sum(done.values())} of {len(done)} {words}"
                          + (f" (FAILED: {', '.join(failed)})" if failed else ""))
        return (f"{', '.join(counts)}, {self.registered} models wrongly registered, "
                f"{self.bytes_lost} bytes lost")


TALLY = pytest.StashKey[Tally]()


def snapshot(root: Path, rels: Iterable[str]) -> Snapshot:
    """Hash and size of every file under the given paths (files or directories), keyed by relative path."""
    out: Snapshot = {}
    for rel in rels:
        p = root / rel
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                out[str(f.relative_to(root))] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size)
    return out


def lost_bytes(before: Snapshot, after: Snapshot) -> int:
    """Bytes of `before` that are not in `after` with the same content."""
    return sum(size for path, (sha, size) in before.items() if after.get(path, ("", 0))[0] != sha)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fault(name): a fault the pipeline must survive; counted in the figure")
    config.addinivalue_line("markers", "bad_input: each parameter is a bad-input class; counted in the figure")
    config.stash[TALLY] = Tally()


@pytest.fixture(scope="session")
def tally(pytestconfig: pytest.Config) -> Tally:
    return pytestconfig.stash[TALLY]


def _case(item: pytest.Item) -> tuple[str, str] | None:
    for kind in KINDS:
        mark = item.get_closest_marker(kind)
        if mark is not None:
            name = mark.args[0] if mark.args else getattr(item, "callspec", None) and item.callspec.id
            return kind, str(name or item.name)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, pytest.TestReport,
                                                                                       pytest.TestReport]:
    """Count a case as passed after its call phase passed; any failed phase (setup too) uncounts it."""
    report = yield
    case = _case(item)
    if case is not None and not report.skipped:
        kind, name = case
        done = item.config.stash[TALLY].outcomes[kind]
        if report.failed:
            done[name] = False
        elif report.when == "call":
            done[name] = True
            detail = dict(item.user_properties).get("outcome")
            if detail:
                item.config.stash[TALLY].details[name] = str(detail)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    t = config.stash.get(TALLY, None)
    if t is None or not any(t.outcomes.values()):
        return
    lines = [t.figure()]
    for kind in KINDS:
        for case, ok in t.outcomes[kind].items():
            detail = t.details.get(case, "")
            lines.append(f"  {kind} {'ok' if ok else 'FAILED'}: {case}" + (f" -> {detail}" if detail else ""))
    terminalreporter.section("reliability figure")
    for line in lines:
        terminalreporter.write_line(line)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")
    terminalreporter.write_line(f"written to {REPORT.relative_to(ROOT)}")
