"""Failure alerts (kd_core.alerts): where they go, what they say, and that sending never raises."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from kd_core import alerts


def test_env_wins_over_params_and_broken_params_leave_the_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(alerts.ENV, raising=False)
    (tmp_path / "params.yaml").write_text("task: tabular\nschedule: {alert_webhook: 'https://hooks.example/params'}\n")
    assert alerts.webhook_url(tmp_path) == "https://hooks.example/params"
    monkeypatch.setenv(alerts.ENV, "https://hooks.example/env")
    assert alerts.webhook_url(tmp_path) == "https://hooks.example/env"
    (tmp_path / "params.yaml").write_text("train: {epochs: 0}\n")  # the failure may be params.yaml itself
    assert alerts.webhook_url(tmp_path) == "https://hooks.example/env"
    monkeypatch.delenv(alerts.ENV)
    assert alerts.webhook_url(tmp_path) is None


def test_payload_leads_with_one_line_of_text():
    p = alerts.failure_payload("kd-distill", "brave-fox", "id-1", "Failed",
                               "Flow run encountered an exception: UserError: train.epochs: bad\nTraceback...", "/p")
    assert p["text"] == ("kd: scheduled run brave-fox of kd-distill failed: Flow run encountered an exception: "
                         "UserError: train.epochs: bad")
    assert (p["flow_run_id"], p["state"], p["project"]) == ("id-1", "Failed", "/p")


def test_send_posts_json_and_never_raises():
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        assert alerts.send(f"http://127.0.0.1:{server.server_address[1]}/hook", {"text": "hi"}) is True
    finally:
        thread.join(timeout=10)
        server.server_close()
    assert got == [{"text": "hi"}]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert alerts.send(f"http://127.0.0.1:{closed}/hook", {"text": "hi"}) is False
