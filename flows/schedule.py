"""Scheduled retraining of the DAG: `kd serve` (one machine) and the build step of prefect.yaml (work
pools). Both take the cron from params.yaml's `schedule:` section, so the schedule is said once.

Retraining is cheap when nothing changed: DVC skips every stage whose inputs are unchanged, and
`register` registers nothing for a candidate identical to an existing version (also on a worker's
fresh checkout: it matches on data, cache, params and code fingerprints, not on local state).
"""

from __future__ import annotations

from pathlib import Path

from prefect.schedules import Cron

from flows.distill import distill
from kd_core.config import Params, load_params

DEPLOYMENT = "scheduled"  # kd serve's deployment: kd-distill/scheduled


def serve_distill(root: Path, params: Params) -> None:
    """Serve the distill flow from this process on schedule.cron until interrupted."""
    distill.serve(name=DEPLOYMENT, parameters={"root": str(root)}, tags=["kd"],
                  schedules=[Cron(params.schedule.cron, timezone=params.schedule.timezone)],
                  description=f"kd DAG of {root}, on {params.schedule.cron} ({params.schedule.timezone})")


def schedule_from_params(root: str = ".") -> dict[str, str]:
    """prefect.yaml build step: {"cron", "timezone", "root"} from params.yaml, for `{{ params.cron }}`."""
    path = Path(root).resolve()
    schedule = load_params(path).schedule
    return {"cron": schedule.cron, "timezone": schedule.timezone, "root": str(path)}
