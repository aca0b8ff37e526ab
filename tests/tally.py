"""The reliability figure, counted by the suite itself rather than written by hand:

    "N of N bad-input classes rejected, M of M faults survived, 0 models wrongly registered, 0 bytes lost"

A test says what it attacks with a marker: `@pytest.mark.fault("name")`, or `@pytest.mark.bad_input`
(the case is the test's parameter id). It counts as rejected/survived only when every phase of it
passed, so a failing test shows as a failure in the figure and is never counted. The two damage
figures are measurements the tests record through the `tally` fixture (tests/reliability/conftest.py)
before they assert, so damage shows in the figure even when it also fails the test. Printed at the
end of the run and written to reports/reliability.txt (gitignored).

Everything travels in the test reports (`user_properties`), which pytest-xdist sends from its workers
to the controller; these hooks are imported by tests/conftest.py, which the controller loads too.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"bad_input": "bad-input classes rejected", "fault": "faults survived"}
REPORT = ROOT / "reports" / "reliability.txt"
CASE, LOST, REGISTERED, OUTCOME = "kd.case", "kd.bytes_lost", "kd.wrongly_registered", "outcome"


@dataclass
class Tally:
    """Outcomes per case (kind -> case -> passed?), and the damage measured along the way."""

    outcomes: dict[str, dict[str, bool]] = field(default_factory=lambda: {k: {} for k in KINDS})
    details: dict[str, str] = field(default_factory=dict)  # case -> its one-line outcome
    registered: int = 0  # model versions created where none should have been
    bytes_lost: int = 0  # bytes of earlier artifacts changed or gone after a fault

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


_CONFIG: dict[str, pytest.Config] = {}  # pytest_runtest_logreport gets no config argument


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG["config"] = config
    config.addinivalue_line("markers", "fault(name): a fault the pipeline must survive; counted in the figure")
    config.addinivalue_line("markers", "bad_input: each parameter is a bad-input class; counted in the figure")
    config.stash[TALLY] = Tally()


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
    """Label the report with its case (kind, name): markers stay in the process that ran the test."""
    report = yield
    case = _case(item)
    if case is not None:
        report.user_properties.append((CASE, list(case)))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count a case as passed after its call phase passed; any failed phase (setup too) uncounts it."""
    props = [(k, v) for k, v in report.user_properties]
    case = next((v for k, v in props if k == CASE), None)
    config = _CONFIG.get("config")
    if case is None or report.skipped or config is None:
        return
    t, (kind, name) = config.stash[TALLY], case
    if report.when == "call":  # damage is measured in the call phase; later reports repeat the properties
        t.bytes_lost += sum(int(v) for k, v in props if k == LOST)
        t.registered += sum(int(v) for k, v in props if k == REGISTERED)
    done = t.outcomes[kind]
    if report.failed:
        done[name] = False
    elif report.when == "call":
        done[name] = True
        detail = next((v for k, v in props if k == OUTCOME), None)
        if detail:
            t.details[name] = str(detail)


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
