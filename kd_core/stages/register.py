"""Stage `register`: record the DAG run in MLflow, register the student, apply the promotion policy.

Writes `metrics/register.json`. A rejected candidate is a successful stage (exit 0). A tracking
server that does not answer fails the stage at once with one line and exit 75 (TransientError);
the orchestration layer (flows/distill.py) owns the retries, as it does for every stage. The model
version is created last, so a failed attempt leaves nothing half-registered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kd_core import registry, tracking
from kd_core.config import Params
from kd_core.fs import atomic_write_text
from kd_core.registry import RegisterOutcome

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


def run(params: Params, workdir: Path) -> RegisterResult:
    tracking.check_tracking(workdir)  # one short probe: MLflow's own client would retry for minutes
    outcome = registry.register_candidate(workdir, params)
    path = workdir / params.paths.metrics / OUTPUT_FILE
    atomic_write_text(path, json.dumps(outcome.to_json(), indent=2) + "\n")
    return RegisterResult(outcome, path)
