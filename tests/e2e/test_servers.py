"""Team servers for real, started from infra/'s own scripts on 127.0.0.1 and free ports:

- an MLflow server on PostgreSQL (infra/postgres-local.sh): the tiny pipeline registers through it, a
  fresh clone of the project registers nothing, two concurrent registrations leave consistent aliases.
  Where PostgreSQL cannot start these tests skip saying why, and fail under KD_REQUIRE_POSTGRES=1
  (.ci/run sets it): they never pass without PostgreSQL;
- an MLflow server on sqlite: the policy and the manual promote/rollback over HTTP;
- a Prefect server + process work pool + worker: prefect.yaml's deployment runs to Completed and
  registers a version, a failed run posts an alert to a receiver on 127.0.0.1, `kd serve` serves
  the flow on params.yaml's cron.

Every server is stopped in a finally block (its whole process group, which it alone is in).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kd_core import data, provenance, registry
from kd_core.config import load_params
from kd_core.stages import register
from tests.conftest import BIN, ROOT, TINY, new_project, stages_ran, write_params
from tests.e2e.test_registry import CHANGED, PARAMS, evaluated_project, save_student, write_eval

pytestmark = pytest.mark.slow
INFRA = ROOT / "infra"
EXPENSIVE = {"prepare", "validate", "teacher", "cache_logits", "train_student", "train_baseline", "evaluate"}
PERMISSIVE = {"min_teacher_retention": 0.0, "min_gain_over_baseline": -1.0}  # the tiny student is weak
IDENTITY = {"GIT_AUTHOR_NAME": "kd test", "GIT_AUTHOR_EMAIL": "test@kd.invalid",
            "GIT_COMMITTER_NAME": "kd test", "GIT_COMMITTER_EMAIL": "test@kd.invalid"}
STARTUP_S: dict[str, float] = {}  # seconds from launch to a healthy answer, per server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "KD_"))}
    return {**env, **IDENTITY, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **extra}


def run(cwd: Path, env: dict[str, str], *args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"{res.args}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@dataclass
class Service:
    """A server process in a session of its own, so stopping it takes its workers down too."""

    name: str
    proc: subprocess.Popen
    log: Path
    url: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def start(name: str, cmd: list[str | Path], env: dict[str, str], health: str, log: Path, cwd: Path = ROOT,
          timeout: float = 240) -> Service:
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    service = Service(name, proc, log, health.rsplit("/", 1)[0])
    while True:
        try:
            urllib.request.urlopen(health, timeout=2).close()
            STARTUP_S[name] = time.monotonic() - t0
            print(f"{name} healthy after {STARTUP_S[name]:.1f} s")
            return service
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                service.stop()
                raise AssertionError(f"{name} did not start:\n{log.read_text()[-4000:]}") from None
            time.sleep(0.25)


@dataclass
class MlflowServer:
    uri: str
    pg_socket: Path  # the PostgreSQL behind it, for psql


def no_postgres(reason: str) -> None:
    """Fail under KD_REQUIRE_POSTGRES=1 (CI), else skip: a PostgreSQL test never passes without it."""
    message = f"PostgreSQL could not start here ({reason}); .ci/run installs it"
    if os.environ.get("KD_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{message}, and KD_REQUIRE_POSTGRES=1 requires it", pytrace=False)
    pytest.skip(message)


def mlflow_server(name: str, tmp: Path, backend_uri: str) -> Service:
    port = free_port()
    env = env_with(MLFLOW_BACKEND_STORE_URI=backend_uri, MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "artifacts"),
                   MLFLOW_PORT=str(port), MLFLOW_WORKERS="2")
    return start(name, [INFRA / "mlflow-server.sh"], env, f"http://127.0.0.1:{port}/health", tmp / f"{name}.log")


@pytest.fixture(scope="module")
def pg_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """MLflow on PostgreSQL, both from infra/'s scripts; skips (or fails, see no_postgres) without it."""
    tmp = tmp_path_factory.mktemp("pg-mlflow")
    pg_dir = Path(tempfile.mkdtemp(prefix="kd-pg-", dir="/tmp"))  # the postgres user must reach it
    pg_env = env_with(KD_PG_DIR=str(pg_dir))
    pg = run(ROOT, pg_env, INFRA / "postgres-local.sh", "start", timeout=120)
    urls = dict(line.split("=", 1) for line in pg.stdout.splitlines() if "=" in line)
    server = None
    try:
        if pg.returncode != 0:
            no_postgres((pg.stderr.strip().splitlines() or ["postgres-local.sh failed"])[-1])
        server = mlflow_server("mlflow-postgresql", tmp, urls["MLFLOW_BACKEND_STORE_URI"])
        yield MlflowServer(server.url, pg_dir / "socket")
    finally:
        if server is not None:
            server.stop()
        if pg.returncode == 0:
            run(ROOT, pg_env, INFRA / "postgres-local.sh", "stop", timeout=60)
        shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sqlite_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("sqlite-mlflow")
    server = mlflow_server("mlflow-sqlite", tmp, f"sqlite:///{tmp / 'mlflow.db'}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project after one full `dvc repro` (against a throw-away store), committed to git.

    Tests copy it for a new MLflow store: DVC does not know which store a run registered in, so the copy
    forgets `register` (its output, dvc.lock entry and run cache) and DVC runs it, and only it, again.
    """
    tmp = tmp_path_factory.mktemp("template")
    proj = new_project(tmp / "proj", TINY, (".dvc/.gitignore", "prefect.yaml"))
    write_params(proj, {"policy": PERMISSIVE})
    env = env_with(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'throwaway.db'}")
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "project"]):
        ok(run(proj, env, "git", *args))
    t0 = time.monotonic()
    ok(run(proj, env, sys.executable, "-m", "dvc", "repro", timeout=900))
    print(f"template project built in {time.monotonic() - t0:.0f} s")
    return proj


def copy_project(template: Path, dest: Path, **params: dict) -> Path:
    """A copy for a new MLflow store: DVC has no record of `register`, so it runs register again."""
    shutil.copytree(template, dest, symlinks=True, ignore=shutil.ignore_patterns("runs"))
    (dest / "metrics/register.json").unlink()
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    del lock["stages"]["register"]
    (dest / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    if params:
        write_params(dest, params)
    return dest


def download(client: MlflowClient, run_id: str, path: str, dest: Path) -> Path:
    return Path(client.download_artifacts(run_id, path, str(dest)))


# --- MLflow server on PostgreSQL: the pipeline, fresh clones, races --------------------------------

def test_pipeline_registers_through_the_server_and_a_fresh_clone_registers_nothing(
        pg_mlflow: MlflowServer, template: Path, tmp_path: Path, shared_dvc_cache: Path):
    a = copy_project(template, tmp_path / "a")
    env = env_with(MLFLOW_TRACKING_URI=pg_mlflow.uri)
    client = MlflowClient(tracking_uri=pg_mlflow.uri)

    first = ok(run(a, env, sys.executable, "-m", "dvc", "repro"))
    assert "register" in stages_ran(first.stdout) and not stages_ran(first.stdout) & EXPENSIVE
    reg = json.loads((a / "metrics/register.json").read_text())
    assert (reg["decision"], reg["version"], reg["aliases"]) == ("promoted", 1, ["challenger", "champion"])

    # lineage: the version leads back to the commit, params.yaml and dvc.lock that made it
    mv = client.get_model_version("kd-student", "1")
    commit = ok(run(a, env, "git", "rev-parse", "HEAD")).stdout.strip()
    assert mv.tags["git_commit"] == commit
    run_ = client.get_run(mv.run_id)
    lock = download(client, mv.run_id, "dvc.lock", tmp_path / "lineage")
    assert {k: v for k, v in run_.data.tags.items() if k.startswith("dvc.")} == provenance.dvc_stage_hashes(lock.parent)
    recorded, now = (yaml.safe_load(f.read_text())["stages"] for f in (lock, a / "dvc.lock"))
    assert all(recorded[stage] == now[stage] for stage in EXPENSIVE)  # the exact data and soft labels
    params_yaml = download(client, mv.run_id, "params.yaml", tmp_path / "lineage")
    assert params_yaml.read_text() == (a / "params.yaml").read_text()
    assert run_.data.params["policy.max_p_value"] == "0.05"

    # a worker's fresh checkout of that commit: dvc.lock from the run, the outputs from the team's DVC
    # remote (here a directory holding what A's cache holds; `dvc pull` brings no run cache)
    remote = tmp_path / "dvc-remote"
    shutil.copytree(shared_dvc_cache, remote, ignore=shutil.ignore_patterns("runs"))
    b = tmp_path / "b"
    ok(run(tmp_path, env, "git", "clone", "-q", str(a), str(b)))
    ok(run(b, env, "git", "checkout", "-q", mv.tags["git_commit"]))
    shutil.copy(lock, b / "dvc.lock")
    ok(run(b, env, sys.executable, "-m", "dvc", "remote", "add", "--local", "-d", "team", str(remote)))
    ok(run(b, env, sys.executable, "-m", "dvc", "pull"))
    assert data.data_fingerprint(b / "data/prepared") == mv.tags["data_fingerprint"]
    assert json.loads((b / "artifacts/logits/manifest.json").read_text())["key"] == mv.tags["cache_key"]

    second = ok(run(b, env, sys.executable, "-m", "dvc", "repro", "register"))
    assert stages_ran(second.stdout) == {"register"} and not stages_ran(second.stdout) & EXPENSIVE
    again = json.loads((b / "metrics/register.json").read_text())
    assert again["version"] == 1 and again["reasons"][0] == "unchanged: identical to version 1"
    assert len(client.search_model_versions("name='kd-student'")) == 1

    # changed inputs make a new candidate, and the policy decides: the same student is no better
    write_params(a, {"policy": {"max_p_value": 0.04}})
    third = ok(run(a, env, sys.executable, "-m", "dvc", "repro", "register"))
    assert "register" in stages_ran(third.stdout) and not stages_ran(third.stdout) & EXPENSIVE
    reg = json.loads((a / "metrics/register.json").read_text())
    assert (reg["decision"], reg["version"], reg["aliases"]) == ("rejected", 2, ["challenger"])
    assert "champion_p_value 1.0000 (0 wins, 0 losses vs version 1) <= 0.0400: fail" in reg["reasons"]
    assert int(client.get_model_version_by_alias("kd-student", "champion").version) == 1
    # and it all lives in PostgreSQL
    assert psql(pg_mlflow, "SELECT version FROM model_versions WHERE name = 'kd-student' ORDER BY 1") == "1\n2"


def psql(server: MlflowServer, query: str) -> str:
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return ok(run(ROOT, env_with(), *as_postgres, shutil.which("psql") or "psql", "-h", server.pg_socket,
                  "-U", "kd", "-d", "mlflow", "-tAc", query)).stdout.strip()


def test_the_server_tests_run_on_postgresql(pg_mlflow: MlflowServer):
    assert psql(pg_mlflow, "SELECT count(*) FROM experiments WHERE name = 'Default'") == "1"


def test_concurrent_registrations_leave_consistent_aliases(pg_mlflow: MlflowServer, template: Path,
                                                            tmp_path: Path):
    """Two checkouts register different candidates at once through the server: the registry lock makes
    one of them see the other as champion, so exactly one is promoted and aliases agree."""
    name = "kd-race"
    env = env_with(MLFLOW_TRACKING_URI=pg_mlflow.uri)
    clones = [copy_project(template, tmp_path / f"c{i}", registry={"model_name": name},
                           policy={"max_p_value": p}) for i, p in enumerate((0.05, 0.04))]
    procs = [subprocess.Popen([str(BIN / "kd"), "stage", "register"], cwd=c, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in clones]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]

    client = MlflowClient(tracking_uri=pg_mlflow.uri)
    regs = [json.loads((c / "metrics/register.json").read_text()) for c in clones]
    assert sorted(r["version"] for r in regs) == [1, 2]
    (winner,) = [r for r in regs if r["decision"] == "promoted"]
    (loser,) = [r for r in regs if r["decision"] == "rejected"]
    assert winner["version"] == 1  # the first to take the lock registered first
    assert any(r.startswith(f"champion_p_value 1.0000 (0 wins, 0 losses vs version {winner['version']})")
               for r in loser["reasons"])  # it was compared with the champion the other one made
    assert int(client.get_model_version_by_alias(name, "champion").version) == winner["version"]
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2
    assert client.get_registered_model(name).tags[registry.HISTORY_TAG] == str(winner["version"])
    assert [m.name for m in client.search_registered_models(f"name LIKE '{name}.lock%'")] == []


# --- MLflow server on sqlite: the policy and manual moves over HTTP -------------------------------

def test_policy_promote_and_rollback_over_http(sqlite_mlflow: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_mlflow)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    root = evaluated_project(tmp_path)
    client = MlflowClient(tracking_uri=sqlite_mlflow)

    save_student(root, cat_bias=10.0)  # v1: weak, but the first candidate: champion
    write_eval(root, teacher=0.34, baseline=0.0)
    assert register.run(PARAMS, root).outcome.decision == "promoted"
    save_student(root)  # v2: better on today's rows, significantly: champion
    write_eval(root)
    v2 = register.run(CHANGED, root).outcome
    assert (v2.decision, v2.aliases) == ("promoted", ("challenger", "champion"))
    save_student(root, cat_bias=10.0)  # v3: worse than the champion re-scored today: challenger only
    write_eval(root, teacher=0.34, baseline=0.0)
    v3 = register.run(load_params_with(root, {"train": {"lr": 0.05}}), root).outcome
    assert (v3.decision, v3.aliases) == ("rejected", ("challenger",))
    mv3 = client.get_model_version("kd-student", "3")
    assert mv3.tags["reason.class_drop"] == "class_drop 1.0000 (class dog vs version 2) <= 0.0500: fail"
    assert mv3.tags["champion_version"] == "2" and not mv3.tags["git_commit"].startswith("unknown")
    assert client.get_model_version("kd-student", "1").tags["successor"] == "2"

    registry.promote(root, PARAMS, 3, "the cat detector is needed for the demo", "alice@ops")
    assert int(client.get_model_version_by_alias("kd-student", "champion").version) == 3
    registry.rollback(root, PARAMS, "demo over", "bob@ops")
    assert int(client.get_model_version_by_alias("kd-student", "champion").version) == 2
    tags = client.get_registered_model("kd-student").tags
    trail = [json.loads(tags[k]) for k in sorted(tags) if k.startswith(registry.AUDIT_PREFIX)]
    assert [(e["action"], e["champion"], e["by"]) for e in trail][2:] == [("manual", 3, "alice@ops"),
                                                                         ("rollback", 2, "bob@ops")]


def load_params_with(root: Path, overrides: dict):
    write_params(root, overrides)
    return load_params(root)


# --- Prefect server + process worker: deployment, schedule, alert, kd serve -----------------------

@dataclass
class Receiver:
    url: str
    posts: list[dict] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1 that records JSON POSTs."""
    posts: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Receiver(f"http://127.0.0.1:{server.server_address[1]}/kd-alerts", posts)
    finally:
        server.shutdown()
        server.server_close()


def api(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def flow_run_state(base: str, run_id: str) -> str:
    return api(base, f"/flow_runs/{run_id}")["state"]["type"]


def deployment_run(proj: Path, env: dict[str, str], name: str, *options: str) -> str:
    out = ok(run(proj, env, BIN / "prefect", "deployment", "run", name, *options)).stdout
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def test_scheduled_runs_on_a_prefect_server_and_worker(template: Path, tmp_path: Path, receiver: Receiver):
    proj = copy_project(template, tmp_path / "proj")
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = env_with(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=base,
                   PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_ENABLED="false", MLFLOW_TRACKING_URI=store,
                   KD_ALERT_WEBHOOK=receiver.url, KD_GIT_REPOSITORY=proj.as_uri(), KD_IMAGE="kd-pipeline:test")
    services: list[Service] = []
    try:
        services.append(start("prefect-server", [INFRA / "prefect-server.sh"], env, f"{base}/health",
                              tmp_path / "prefect-server.log"))
        ok(run(proj, env, BIN / "prefect", "work-pool", "create", "kd-process", "--type", "process"))
        ok(run(proj, env, BIN / "prefect", "work-pool", "create", "kd-kubernetes", "--type", "kubernetes",
               "--base-job-template", INFRA / "k8s-base-job-template.json"))  # the server checks the template
        ok(run(proj, env, BIN / "prefect", "--no-prompt", "deploy", "--all"))

        schedule = load_params(proj).schedule
        local = api(base, "/deployments/name/kd-distill/local")
        assert local["schedules"][0]["schedule"]["cron"] == schedule.cron  # said once, in params.yaml
        assert local["schedules"][0]["schedule"]["timezone"] == schedule.timezone
        assert local["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(proj)}}]
        assert local["work_pool_name"] == "kd-process"
        k8s = api(base, "/deployments/name/kd-distill/kubernetes")
        assert k8s["job_variables"] == {"image": "kd-pipeline:test"} and k8s["work_pool_name"] == "kd-kubernetes"
        assert k8s["pull_steps"][0]["prefect.deployments.steps.git_clone"]["repository"] == proj.as_uri()

        good = deployment_run(proj, env, "kd-distill/local")
        broken = copy_project(template, tmp_path / "broken", train={"epochs": 0})  # a run that must alert
        bad = deployment_run(proj, env, "kd-distill/local", "--param", f"root={broken}")
        ok(run(proj, env, INFRA / "prefect-worker.sh", "--run-once"))  # runs both, then exits
        assert flow_run_state(base, good) == "COMPLETED"
        versions = MlflowClient(tracking_uri=store).search_model_versions("name='kd-student'")
        assert [int(v.version) for v in versions] == [1]
        assert json.loads((proj / "metrics/register.json").read_text())["version"] == 1

        assert flow_run_state(base, bad) == "FAILED"
        (alert,) = receiver.posts  # the failed run alerted, the good one did not
        assert (alert["flow_run_id"], alert["state"], alert["flow"], alert["project"]) == (
            bad, "Failed", "kd-distill", str(broken))
        assert "train.epochs" in alert["text"] and alert["text"].startswith("kd: scheduled run ")

        with (tmp_path / "serve.log").open("wb") as out:  # one machine, no pool: kd serve
            serve = subprocess.Popen([str(BIN / "kd"), "serve"], cwd=proj, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        services.append(Service("kd-serve", serve, tmp_path / "serve.log"))
        deadline = time.monotonic() + 120
        while True:
            try:
                served = api(base, "/deployments/name/kd-distill/scheduled")
                break
            except OSError:
                assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.5)
        assert served["schedules"][0]["schedule"]["cron"] == schedule.cron
        assert served["parameters"] == {"root": str(proj)}
    finally:
        for service in reversed(services):
            service.stop()
