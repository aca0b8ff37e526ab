"""Alerts for failed scheduled runs: one JSON POST to a webhook (Slack-, Teams- or anything-compatible).

The URL comes from `KD_ALERT_WEBHOOK` (the environment of the worker, where a URL with a token
belongs) or else `schedule.alert_webhook` in params.yaml. Sending never raises: an alert that
cannot be delivered is logged, and must not hide the failure it reports.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from kd_core.config import load_params
from kd_core.errors import UserError

ENV = "KD_ALERT_WEBHOOK"
TIMEOUT_S = 10.0  # a webhook that takes longer is down; the flow's own state is the record anyway
log = logging.getLogger(__name__)


def webhook_url(root: Path) -> str | None:
    """Where alerts go, or None. The failure may be params.yaml itself: then only the env var tells."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    try:
        return load_params(root).schedule.alert_webhook
    except UserError:
        return None


def failure_payload(flow: str, run: str, run_id: str, state: str, message: str, root: str) -> dict:
    """`text` is what chat webhooks show; the other keys are for machines."""
    first = (message.strip().splitlines() or ["no message"])[0][:500]
    return {"text": f"kd: scheduled run {run} of {flow} {state.lower()}: {first}", "flow": flow, "flow_run": run,
            "flow_run_id": run_id, "state": state, "message": first, "project": root}


def send(url: str, payload: dict) -> bool:
    """POST `payload` as JSON; True when the receiver answered 2xx."""
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("kd: could not deliver the failure alert to the webhook: %s", exc)
        return False
