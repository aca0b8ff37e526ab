"""The MLflow tracking server goes down before `register`, then comes back.

A real `mlflow server` (infra/mlflow-server.sh: sqlite backend, local artifacts, 127.0.0.1) holds a
champion. A new candidate is trained while the server is down: the compute stages never need it, and
`register` probes once and fails at once with one line and exit 75 (a transient failure). Nothing may
be half-registered and no alias may move. Then the flow's own retry layer: the real Prefect task of
`register` (flows/distill.py: its retries, delays and retry condition) runs the stage during the
outage; the server comes back before the retry, which registers the candidate.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from prefect import flow

from flows import distill
from kd_core.errors import TransientError
from tests.conftest import dvc, git, stages_ran, write_params
from tests.e2e.test_servers import INFRA, PERMISSIVE, Service, env_with, free_port, start
from tests.reliability.conftest import Damage, lost_bytes, snapshot

pytestmark = pytest.mark.slow
NAME = "kd-student"
GUARDED = ("artifacts", "metrics/eval.json", "dvc.lock")  # the candidate's work must outlive the outage


class Server:
    """`mlflow server` on one fixed port, so clients keep their MLFLOW_TRACKING_URI across a restart."""

    def __init__(self, home: Path) -> None:
        self.home, self.port, self.starts = home, free_port(), 0
        self.service: Service | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        env = env_with(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{self.home / 'mlflow.db'}",
                       MLFLOW_ARTIFACTS_DESTINATION=str(self.home / "artifacts"), MLFLOW_PORT=str(self.port),
                       MLFLOW_WORKERS="1")
        self.service = start(f"mlflow-{self.starts}", [INFRA / "mlflow-server.sh"], env, f"{self.uri}/health",
                             self.home / f"mlflow-{self.starts}.log")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


def registry_state(client: MlflowClient) -> tuple[list[int], dict[str, int], int]:
    """Versions, aliases and the number of runs: what a half-finished registration would change."""
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    aliases = {a: int(v) for a, v in client.get_registered_model(NAME).aliases.items()}
    runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    return versions, aliases, runs


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "mlflow-server")
    srv.home.mkdir()
    try:
        yield srv
    finally:
        srv.stop()


def retried_register(root: Path, server: Server) -> tuple[distill.StageOutcome, int]:
    """The flow's own `register` task in a flow; its retry condition, the real one, also restarts the
    server after the first failure, as an operator would between two attempts."""
    attempts = []

    def restart_then_decide(task, task_run, state) -> bool:
        attempts.append(state.name)
        if server.service is None or server.service.proc.poll() is not None:
            server.start()
        return distill._transient(task, task_run, state)

    register = distill.stage_tasks["register"].with_options(retry_condition_fn=restart_then_decide)

    @flow
    def only_register() -> distill.StageOutcome:
        return register("register", str(root), None)

    return only_register(), len(attempts)


@pytest.mark.fault("MLflow server down at register")
def test_register_fails_fast_then_the_flow_retries_it_after_the_restart(
        project: Path, server: Server, tally: Damage, monkeypatch: pytest.MonkeyPatch) -> None:
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    write_params(project, {"policy": PERMISSIVE})  # the tiny student is weak; the first one is champion
    git(project, "commit", "-qam", "permissive policy")
    good = dvc(project, "repro", "register")
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    client = MlflowClient(tracking_uri=server.uri)
    assert registry_state(client) == ([1], {"champion": 1, "challenger": 1}, 1)

    server.stop()  # the outage: a candidate is trained and evaluated without the server
    temperature = yaml.safe_load((project / "params.yaml").read_text())["distill"]["temperature"]
    write_params(project, {"distill": {"temperature": temperature + 2.0}})
    git(project, "commit", "-qam", "candidate")
    trained = dvc(project, "repro", "evaluate")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert stages_ran(trained.stdout) == {"train_student", "evaluate"}
    before = snapshot(project, GUARDED)

    failed = dvc(project, "repro", "register")
    after = snapshot(project, GUARDED)
    tally.lost(lost_bytes(before, after))
    server.start()  # only to read the registry's state; the outage resumes below
    state = registry_state(client)
    locks = [m.name for m in client.search_registered_models(f"name LIKE '{NAME}.lock%'")]
    server.stop()
    tally.wrongly_registered(len(state[0]) - 1)

    errors = [ln for ln in failed.stderr.splitlines() if ln.startswith("kd: error:")]
    assert failed.returncode != 0 and f"exited with {TransientError.exit_code}" in failed.stderr, failed.stderr[-3000:]
    assert len(errors) == 1, failed.stderr[-3000:]
    assert "Traceback" not in failed.stdout + failed.stderr, failed.stderr[-3000:]
    assert server.uri in errors[0] and "unreachable" in errors[0], errors[0]
    assert state == ([1], {"champion": 1, "challenger": 1}, 1)  # no version, no alias moved, no run
    assert locks == []  # no registry lock left behind
    assert after == before  # the candidate's model and metrics wait for the server, byte for byte

    outcome, attempts = retried_register(project, server)  # down at the first try, back for the retry
    assert attempts == 1 and outcome.ran, attempts
    reg = json.loads((project / "metrics/register.json").read_text())
    assert reg["version"] == 2 and "challenger" in reg["aliases"], reg
    versions, aliases, _ = registry_state(client)
    assert versions == [1, 2] and aliases["challenger"] == 2
    assert aliases["champion"] == (2 if reg["decision"] == "promoted" else 1), (reg, aliases)
    mv = client.get_model_version(NAME, "2")
    assert mv.tags["decision"] == reg["decision"] and mv.tags["champion_version"] == "1"
