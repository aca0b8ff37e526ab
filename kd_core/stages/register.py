"""Stage `register`: record the DAG run in MLflow, register the student, apply the promotion policy.

Writes `metrics/register.json`. A rejected candidate is a successful stage (exit 0). A tracking
server that does not answer is retried with backoff, then the stage fails with one line; the model
version is created last, so a failed attempt leaves nothing half-registered.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from kd_core import registry
from kd_core.config import Params
from kd_core.errors import UserError
from kd_core.registry import RegisterOutcome
from kd_core.stages import atomic_write_text

RETRY_DELAYS_S = (2.0, 5.0, 10.0)  # long enough for a tracking server to restart, short for a dead one
OUTPUT_FILE = "register.json"


@dataclass(frozen=True)
class RegisterResult:
    outcome: RegisterOutcome
    path: Path

    def summary(self) -> str:
        o = self.outcome
        what = "unchanged" if o.unchanged else o.decision
        aliases = ", ".join(o.aliases) or "no aliases"
        return f"{o.model_name} version {o.version} {what} ({aliases}) -> {self.path}"


def _attempt(params: Params, workdir: Path) -> RegisterOutcome:
    registry.check_tracking(workdir)
    return registry.register_candidate(workdir, params)


def _with_retries(params: Params, workdir: Path) -> RegisterOutcome:
    """Retry only an unreachable tracking store; every other error is final on the first try."""
    for delay in RETRY_DELAYS_S:
        try:
            return _attempt(params, workdir)
        except registry.TrackingUnavailable:
            time.sleep(delay)
    try:
        return _attempt(params, workdir)
    except registry.TrackingUnavailable as exc:
        raise UserError(f"{exc} (gave up after {len(RETRY_DELAYS_S) + 1} attempts)") from None


def run(params: Params, workdir: Path) -> RegisterResult:
    outcome = _with_retries(params, workdir)
    path = workdir / params.paths.metrics / OUTPUT_FILE
    atomic_write_text(path, json.dumps(outcome.to_json(), indent=2) + "\n")
    return RegisterResult(outcome, path)
