"""Flow hooks: a failed or crashed scheduled run of the DAG posts an alert (kd_core.alerts)."""

from __future__ import annotations

from pathlib import Path

from prefect import Flow
from prefect.client.schemas.objects import FlowRun
from prefect.logging.loggers import flow_run_logger
from prefect.states import State

from kd_core import alerts


def alert_on_failure(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """on_failure / on_crashed hook. Only deployed runs (a schedule, a worker, `kd serve`) alert: a
    person running `kd run` already sees the one-line error."""
    if flow_run.deployment_id is None:
        return
    root = Path(str(flow_run.parameters.get("root") or ".")).resolve()
    url = alerts.webhook_url(root)
    if url is None:
        return
    payload = alerts.failure_payload(flow.name, flow_run.name, str(flow_run.id), state.name,
                                     state.message or "", str(root))
    delivered = alerts.send(url, payload)
    flow_run_logger(flow_run, flow).info(f"failure alert {'sent' if delivered else 'NOT delivered'}: "
                                         f"{payload['text']}")
