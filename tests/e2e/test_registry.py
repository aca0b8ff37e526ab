"""Registration against a real MLflow sqlite store: idempotence, promotion, aliases, serving raw rows."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from kd_core import data, lock, models, provenance, registry, serving, tracking
from kd_core.config import Params, parse_params
from kd_core.errors import TransientError, UserError
from kd_core.stages import register

NAME = "kd-student"
FEATURES = ("f0", "f1", "f2", "f3")
SCHEMA = data.Schema(FEATURES, "label", ("cat", "dog", "eel"))
PARAMS = Params()
CHANGED = parse_params({"train": {"lr": 0.01}})  # another configuration: a new candidate


def rows(n: int, seed: int) -> pd.DataFrame:
    """Class k has feature k raised: the hand-set student below classifies it perfectly."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(SCHEMA.classes)
    x = rng.normal(0.0, 0.3, (n, len(FEATURES))).astype(np.float32)
    x[np.arange(n), y] += 3.0
    df = pd.DataFrame(x, columns=list(FEATURES))
    df["label"] = np.asarray(SCHEMA.classes)[y]
    return df


def save_student(root: Path, cat_bias: float = 0.0) -> None:
    """A linear student (mlp without hidden layers) whose logit k is feature k: perfect on rows().
    `cat_bias` pushes it towards 'cat'; 10 makes it answer 'cat' always (accuracy 1/3)."""
    spec = models.ModelSpec("mlp", {"hidden": []}, SCHEMA)
    model = models.build(spec)
    with torch.no_grad():
        model.net[0].weight.copy_(torch.eye(3, 4))  # (K, F)
        model.net[0].bias.copy_(torch.tensor([cat_bias, 0.0, 0.0]))
    models.save(model, spec, root / PARAMS.paths.student)


def write_eval(root: Path, teacher: float = 1.0, baseline: float = 0.3, student: float | None = None) -> float:
    """eval.json as the evaluate stage writes it; the student's accuracy is the saved student's own
    on the test split (register refuses a stale eval.json), unless `student` overrides it."""
    model, spec = models.load(root / PARAMS.paths.student)
    test = pd.read_parquet(root / PARAMS.paths.prepared / "test.parquet")
    ok = serving.predict_frame(model, spec, test) == test["label"].to_numpy(dtype=object)
    per_class = {c: float(ok[test["label"].to_numpy() == c].mean()) for c in SCHEMA.classes}
    extra = {"ece": 0.02, "nll": 0.2, "agreement_with_teacher": 0.95, "params": 15, "macs": 12,
             "latency_ms_p50": 0.05, "size_bytes": 400}
    ev = {r: {"accuracy": a, **extra, "per_class_accuracy": per_class}
          for r, a in (("teacher", teacher), ("student", float(ok.mean()) if student is None else student),
                       ("baseline", baseline))}
    ev["teacher"]["latency_ms_p50"] = 0.5
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/eval.json").write_text(json.dumps(ev))
    return ev["student"]["accuracy"]


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Creating MLflow's schema takes seconds; every test copies one migrated store instead."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def evaluated_project(tmp_path: Path) -> Path:
    """A project after `evaluate`: prepared splits, a student, eval.json, cache manifest, dvc.lock."""
    train, test = rows(60, 0), rows(30, 1)
    data.write_prepared(data.Splits(train, test, train[list(FEATURES)].head(10), SCHEMA),
                        tmp_path / PARAMS.paths.prepared)
    save_student(tmp_path)
    write_eval(tmp_path)
    (tmp_path / PARAMS.paths.logits).mkdir(parents=True)
    (tmp_path / PARAMS.paths.logits / "manifest.json").write_text(
        json.dumps({"key": "cache-1", "teacher_fingerprint": "teacher-1"}))
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  prepare:\n    cmd: kd stage prepare\n"
                                       "    outs:\n    - path: data/prepared\n      md5: abc.dir\n")
    (tmp_path / PARAMS.paths.validation).mkdir(parents=True)
    (tmp_path / PARAMS.paths.validation / "train.json").write_text('{"success": true}')
    (tmp_path / "params.yaml").write_text("task: tabular\n")  # the defaults: PARAMS
    # a committed project, as in real use: outside git the commit is a unique `unknown-…` marker
    (tmp_path / ".gitignore").write_text("data/\nartifacts/\nmetrics/\nreports/\n.kd/\nmlflow.db\nmlruns/\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "evaluated project")
    return tmp_path


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_db: Path) -> Path:
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return evaluated_project(tmp_path)


def register_json(root: Path) -> dict:
    return json.loads((root / "metrics/register.json").read_text())


def test_first_candidate_is_promoted_and_recorded(root: Path):
    result = register.run(PARAMS, root)

    assert result.summary().startswith("kd-student version 1 promoted (challenger, champion)")
    reg = register_json(root)
    assert reg == {"decision": "promoted", "reasons": list(result.outcome.reasons), "model_name": NAME,
                   "version": 1, "aliases": ["challenger", "champion"]}
    client = MlflowClient()
    mv = client.get_model_version(NAME, "1")
    assert mv.tags["decision"] == "promoted"
    assert mv.tags["reason.gain_over_champion"] == "gain_over_champion n/a (no champion): pass"
    assert mv.tags["reason.latency_ratio"] == "latency_ratio 0.1000 <= 0.5000: pass"
    assert mv.tags["champion_version"] == "none" and mv.tags["promotion"] == "policy"
    assert mv.tags["cache_key"] == "cache-1" and mv.tags["teacher_fingerprint"] == "teacher-1"
    assert mv.tags["params_hash"] == PARAMS.digest() and mv.tags["git_commit"] == git(root, "rev-parse", "HEAD")
    assert mv.tags["data_fingerprint"] == data.data_fingerprint(root / PARAMS.paths.prepared)

    run = client.get_run(result.outcome.run_id)
    assert mv.run_id == run.info.run_id
    assert run.data.params["train.lr"] == "0.002" and run.data.params["registry.model_name"] == NAME
    assert run.data.params["data.feature_columns"] == "null"
    assert run.data.metrics["student.accuracy"] == 1.0 and "baseline.latency_ms_p50" in run.data.metrics
    assert run.data.tags["dvc.prepare"] and run.data.tags["git_commit"] == mv.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"dvc.lock", "params.yaml", "metrics", "reports"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reports/validation")] == [
        "reports/validation/train.json"]
    assert (root / "mlruns" / PARAMS.registry.experiment).is_dir()  # artifacts sit by the store


def test_identical_candidate_registers_nothing(root: Path):
    register.run(PARAMS, root)
    again = register.run(PARAMS, root)

    assert again.outcome.unchanged and again.outcome.version == 1
    reg = register_json(root)
    assert reg["reasons"][0] == "unchanged: identical to version 1"
    assert reg["decision"] == "promoted" and reg["aliases"] == ["challenger", "champion"]
    assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 1


def test_worse_candidate_is_rejected_and_champion_stays(root: Path):
    register.run(PARAMS, root)
    save_student(root, cat_bias=10.0)  # answers 'cat' always; the champion re-scores 1.0 on today's rows
    write_eval(root)

    result = register.run(CHANGED, root)

    reg = register_json(root)
    assert (reg["decision"], reg["version"], reg["aliases"]) == ("rejected", 2, ["challenger"])
    assert "gain_over_champion -0.6667 vs version 1 >= 0.0000: fail" in reg["reasons"]
    assert "class_drop 1.0000 (class dog vs version 1) <= 0.0500: fail" in reg["reasons"]
    client = MlflowClient()
    assert client.get_model_version_by_alias(NAME, "champion").version == 1
    assert client.get_model_version_by_alias(NAME, "challenger").version == 2
    assert client.get_run(result.outcome.run_id).data.metrics["champion.accuracy"] == 1.0


def test_better_candidate_replaces_champion(root: Path):
    save_student(root, cat_bias=10.0)
    write_eval(root, teacher=0.34, baseline=0.0)
    register.run(PARAMS, root)  # no champion yet: the first candidate that passes the rest is champion
    save_student(root)
    write_eval(root)

    register.run(CHANGED, root)

    client = MlflowClient()
    assert register_json(root)["aliases"] == ["challenger", "champion"]
    assert client.get_model_version_by_alias(NAME, "champion").version == 2
    assert client.get_model_version(NAME, "1").tags["successor"] == "2"
    assert client.get_model_version(NAME, "1").aliases == []
    reasons = register_json(root)["reasons"]  # 20 rows the old champion got wrong, none it got right
    assert "champion_p_value 0.0000 (20 wins, 0 losses vs version 1) <= 0.0500: pass" in reasons


def test_stale_eval_json_is_refused(root: Path):
    """eval.json must describe the model being registered: the policy's numbers are its numbers."""
    write_eval(root, student=0.5)  # the saved student scores 1.0

    with pytest.raises(UserError, match=r"eval.json is stale: student accuracy 0.5000, but .* scores 1.0000"):
        register.run(PARAMS, root)

    assert MlflowClient().search_model_versions(f"name='{NAME}'") == []


def audit_trail(client: MlflowClient) -> list[dict]:
    tags = client.get_registered_model(NAME).tags
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith("audit.")]


def test_manual_promote_and_rollback_leave_an_audit_trail(root: Path):
    save_student(root, cat_bias=10.0)
    write_eval(root, teacher=0.34, baseline=0.0)
    register.run(PARAMS, root)  # v1: champion by policy (first)
    save_student(root)
    write_eval(root)
    register.run(CHANGED, root)  # v2: beats v1 significantly: champion by policy
    save_student(root, cat_bias=10.0)
    write_eval(root, teacher=0.34, baseline=0.0)
    assert register.run(parse_params({"train": {"lr": 0.02}}), root).outcome.decision == "rejected"  # v3

    client = MlflowClient()
    move = registry.promote(root, PARAMS, 3, "  canary   needs the cat model ", "alice@ops")
    assert move.summary().startswith("kd-student version 3 is champion (was version 2): manual by alice@ops at ")
    assert move.summary().endswith(": canary needs the cat model")
    v3 = client.get_model_version(NAME, "3")
    assert sorted(v3.aliases) == ["challenger", "champion"] and v3.tags["decision"] == "rejected"  # verdict stays
    assert (v3.tags["promotion"], v3.tags["promoted_by"], v3.tags["promotion_reason"]) == (
        "manual", "alice@ops", "canary needs the cat model")
    assert client.get_model_version(NAME, "2").tags["successor"] == "3"

    assert registry.rollback(root, PARAMS, "cat model misfires", "bob@ops").champion == 2
    assert client.get_model_version(NAME, "3").tags["rolled_back_by"] == "bob@ops"
    assert client.get_model_version(NAME, "2").tags["promotion"] == "rollback"
    assert registry.rollback(root, PARAMS, "further back", "bob@ops").champion == 1
    with pytest.raises(UserError, match="version 1 has no previous champion to roll back to"):
        registry.rollback(root, PARAMS, "again", "bob@ops")

    trail = [(e["action"], e["champion"], e["previous"], e["by"]) for e in audit_trail(client)]
    assert [t[:3] for t in trail] == [("policy", 1, None), ("policy", 2, 1), ("manual", 3, 2),
                                      ("rollback", 2, 3), ("rollback", 1, 2)]
    assert trail[2][3] == "alice@ops" and trail[3][3] == "bob@ops"
    assert all(e["reason"] and e["at"] for e in audit_trail(client))
    assert int(client.get_model_version_by_alias(NAME, "challenger").version) == 3  # challengers stay


def test_promote_refuses_what_it_cannot_do(root: Path):
    with pytest.raises(UserError, match="kd-student has no version 1"):
        registry.promote(root, PARAMS, 1, "why", "me")
    with pytest.raises(UserError, match="has no champion"):
        registry.rollback(root, PARAMS, "why", "me")
    register.run(PARAMS, root)
    with pytest.raises(UserError, match="version 1 is already the champion"):
        registry.promote(root, PARAMS, 1, "why", "me")
    with pytest.raises(UserError, match="--reason is empty"):
        registry.promote(root, PARAMS, 1, "   ", "me")


def test_kd_promote_and_rollback_commands(root: Path):
    register.run(PARAMS, root)
    save_student(root, cat_bias=10.0)
    write_eval(root)
    register.run(CHANGED, root)  # rejected: version 2
    (root / "dvc.yaml").write_text("stages: {}\n")
    kd = str(Path(sys.executable).parent / "kd")

    promoted = subprocess.run([kd, "promote", "2", "--reason", "hotfix", "--by", "carol"], cwd=root,
                              capture_output=True, text=True, timeout=120)
    assert promoted.returncode == 0, promoted.stderr
    assert "kd-student version 2 is champion (was version 1): manual by carol" in promoted.stdout
    missing = subprocess.run([kd, "promote", "9", "--reason", "x"], cwd=root, capture_output=True, text=True,
                             timeout=120)
    assert (missing.returncode, missing.stderr.strip().splitlines()) == (
        1, [f"kd: error: kd-student has no version 9 in {os.environ['MLFLOW_TRACKING_URI']}"])
    back = subprocess.run([kd, "rollback", "--reason", "hotfix reverted"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert back.returncode == 0, back.stderr
    assert "kd-student version 1 is champion (was version 2): rollback by " in back.stdout
    assert int(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == 1


def test_registry_lock_excludes_and_breaks_a_dead_holders_lock(root: Path):
    """The lock for shared stores, on the sqlite store here: at most one holder, stale ones broken."""
    client = MlflowClient()
    first = lock._RegistryLock(client, NAME, lease_s=60, timeout_s=1.0)
    first.acquire()
    waiter = lock._RegistryLock(client, NAME, lease_s=60, timeout_s=1.0)
    # a busy lock is worth waiting for (its holder finishes or its lease runs out): exit 75, retried
    with pytest.raises(TransientError, match=rf"registry lock {NAME}.lock is held by .* pid {os.getpid()}; gave up"):
        waiter.acquire()
    first.release()
    waiter.acquire()  # free again
    waiter.release()

    dead = lock._RegistryLock(client, NAME, lease_s=0.0, timeout_s=1.0)
    dead.acquire()  # and never released: its holder died
    survivor = lock._RegistryLock(client, NAME, lease_s=60, timeout_s=5.0)
    survivor.acquire()
    assert client.get_registered_model(f"{NAME}.lock").tags["token"] == survivor.token
    assert client.get_registered_model(f"{NAME}.lock.broken.{dead.token}")  # the record of the break
    dead.release()  # a late release must not free the survivor's lock
    assert client.get_registered_model(f"{NAME}.lock").tags["token"] == survivor.token
    survivor.release()
    assert [m.name for m in client.search_registered_models() if m.name == f"{NAME}.lock"] == []


def test_a_late_breaker_never_breaks_the_next_holders_lock(root: Path):
    """The check-then-act race: a waiter saw the expired lock of `dead`, but before it breaks it the
    dead holder's lock is gone and `next_` holds a fresh one. Breaking by the stale token must leave
    `next_`'s lock in place (it used to rename whatever `<name>.lock` was at that moment)."""
    client = MlflowClient()
    dead = lock._RegistryLock(client, NAME, lease_s=0.0, timeout_s=1.0)
    dead.acquire()
    stale = dead.token  # what the waiter read
    client.rename_registered_model(f"{NAME}.lock", f"{NAME}.lock.gone")  # the dead lock goes away…
    next_ = lock._RegistryLock(client, NAME, lease_s=60, timeout_s=1.0)
    next_.acquire()  # …and someone takes the lock
    waiter = lock._RegistryLock(client, NAME, lease_s=60, timeout_s=1.0)
    waiter._break(stale)
    assert client.get_registered_model(f"{NAME}.lock").tags["token"] == next_.token
    dead.release()  # a holder whose lease ran out releases late: the same must hold
    assert client.get_registered_model(f"{NAME}.lock").tags["token"] == next_.token
    next_.release()
    assert [m.name for m in client.search_registered_models() if m.name == f"{NAME}.lock"] == []
    client.delete_registered_model(f"{NAME}.lock.gone")


def test_bad_evidence_fails_before_anything_is_recorded(root: Path):
    ev = json.loads((root / "metrics/eval.json").read_text())
    del ev["student"]["accuracy"]
    (root / "metrics/eval.json").write_text(json.dumps(ev))

    with pytest.raises(UserError, match="student metrics lack 'accuracy'"):
        register.run(PARAMS, root)

    client = MlflowClient()
    assert client.search_model_versions(f"name='{NAME}'") == []
    assert client.get_experiment_by_name(PARAMS.registry.experiment) is None  # no run was created


def test_champion_that_cannot_score_todays_data_stops_registration(root: Path):
    register.run(PARAMS, root)
    splits = data.read_prepared(root / PARAMS.paths.prepared)
    renamed = data.Schema(("f0", "f1", "g2", "f3"), "label", SCHEMA.classes)
    data.write_prepared(data.Splits(*(df.rename(columns={"f2": "g2"}) for df in
                                      (splits.train, splits.test, splits.transfer)), renamed),
                        root / PARAMS.paths.prepared)

    with pytest.raises(UserError, match=r"models:/kd-student/1 cannot score .*missing inputs") as exc:
        register.run(CHANGED, root)

    assert "\n" not in str(exc.value)
    assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 1


def test_unknown_dag_run_id_is_a_one_line_error(root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    with pytest.raises(UserError, match="MLFLOW_RUN_ID=0123456789abcdef0123456789abcdef is not a run"):
        register.run(PARAMS, root)


def test_champion_serves_class_names_from_raw_rows(root: Path):
    register.run(PARAMS, root)
    test = pd.read_parquet(root / PARAMS.paths.prepared / "test.parquet")
    raw = test.drop(columns=["label"])[["f3", "f1", "f0", "f2"]].assign(note=1.0)

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")

    assert list(model.predict(raw)) == test["label"].tolist()
    probs = model.predict(raw.head(3), params={"output": "probabilities"})
    assert list(probs.columns) == ["cat", "dog", "eel"]
    assert np.allclose(probs.to_numpy().sum(axis=1), 1.0)
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"missing inputs \['f2'\]"):
        model.predict(raw.drop(columns=["f2"]))


def test_predict_frame_names_missing_columns_and_keeps_integer_classes():
    schema = data.Schema(FEATURES, "label", (3, 5, 7))
    spec = models.ModelSpec("mlp", {"hidden": []}, schema)
    model = models.build(spec)
    with torch.no_grad():
        model.net[0].weight.copy_(torch.eye(3, 4))
        model.net[0].bias.zero_()
    frame = pd.DataFrame([[0.0, 0.0, 2.0, 9.0], [1.0, 0.0, 0.0, 9.0]], columns=list(FEATURES))

    assert serving.predict_frame(model, spec, frame).tolist() == [7, 3]
    with pytest.raises(UserError, match=r"lacks feature column\(s\) \['f1'\]"):
        serving.predict_frame(model, spec, frame.drop(columns=["f1"]))
    with pytest.raises(UserError, match="unknown output 'logits'"):
        serving.predict_frame(model, spec, frame, output="logits")


def test_registered_model_downloads_as_a_kd_model_dir(root: Path):
    """teacher.source may be an MLflow URI: the kd directory inside the registered model."""
    register.run(PARAMS, root)
    local = serving.download_model_dir(f"models:/{NAME}@champion", root / ".kd/teacher-download", root)
    _, spec = models.load(local)
    assert spec.schema == SCHEMA


def test_dag_run_holds_epoch_metrics_and_the_registration(root: Path, monkeypatch: pytest.MonkeyPatch):
    tracking.log_epoch_metrics(root, {"student.loss": 1.0}, 1)  # no run id: nothing, no error
    run_id = tracking.start_dag_run(root, PARAMS)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    for epoch, loss in enumerate([0.9, 0.5], start=1):
        tracking.log_epoch_metrics(root, {"student.loss": loss}, epoch)
    mlflow.flush_async_logging()

    outcome = register.run(PARAMS, root).outcome
    tracking.end_dag_run(root, run_id, "FINISHED")

    client = MlflowClient()
    assert outcome.run_id == run_id
    assert [m.value for m in client.get_metric_history(run_id, "student.loss")] == [0.9, 0.5]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["student.accuracy"] == 1.0
    assert client.get_experiment(run.info.experiment_id).name == PARAMS.registry.experiment
    assert len(client.search_runs([run.info.experiment_id])) == 1  # register made no second run


def test_unreachable_server_fails_with_one_line(root: Path, monkeypatch: pytest.MonkeyPatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")

    with pytest.raises(TransientError, match=r"unreachable") as exc:  # exit 75: the flow retries it
        register.run(PARAMS, root)
    assert "\n" not in str(exc.value)
    assert not (root / "metrics/register.json").exists()

    # a teacher from that store (teacher.source: models:/…) is the same transient outage, not exit 1
    with pytest.raises(TransientError, match=r"unreachable"):
        serving.download_model_dir(f"models:/{NAME}/1", root / ".kd/dl", root)


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """A tracking server that is up but failing: every request answers 503."""

    def _answer(self) -> None:
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    try:
        yield uri
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_answering_5xx_is_a_transient_outage(root: Path, failing_server: str):
    """The probe passes (the server answers), then every MLflow call fails with 503: register, the
    registry lock, loading the champion to score it and a teacher download from that store fail with
    exit 75 (retried), not exit 1."""
    with pytest.raises(TransientError, match=rf"MLflow at {failing_server} is unavailable") as exc:
        register.run(PARAMS, root)
    assert "\n" not in str(exc.value)
    assert not (root / "metrics/register.json").exists()

    with pytest.raises(TransientError), tracking.tracking_errors(failing_server), \
            lock.registry_lock(failing_server, NAME):
        pass
    mlflow.set_tracking_uri(failing_server)  # as register_candidate does before scoring the champion
    with pytest.raises(TransientError, match="unavailable"):  # was "cannot score": exit 1, never retried
        serving.predict_registered(f"models:/{NAME}/1", pd.DataFrame({"f0": [0.0]}))
    with pytest.raises(TransientError, match="unavailable"):
        serving.download_model_dir(f"models:/{NAME}/1", root / ".kd/dl", root)


def test_a_version_logged_by_another_kd_release_scores_with_its_own_code(root: Path):
    """A model's code imports KDPyfuncModel by module path (`kd_core.registry` before the split) from
    the kd_core logged with it. Scored in this process (register compares with the champion), this
    kd_core must not shadow that copy; and this process's modules are back afterwards."""
    register.run(PARAMS, root)
    client = MlflowClient()
    stored = Path(urllib.parse.urlparse(client.get_model_version_download_uri(NAME, "1")).path)
    (stored / "code/kd_core/serving.py").rename(stored / "code/kd_core/served_before.py")  # another release's layout
    code = stored / "kd_pyfunc_model.py"
    code.write_text(code.read_text().replace("kd_core.serving", "kd_core.served_before"))
    ours = sys.modules["kd_core.serving"]
    test = pd.read_parquet(root / PARAMS.paths.prepared / "test.parquet")

    predictions = serving.predict_registered(f"models:/{NAME}/1", test.drop(columns=["label"]))

    assert predictions.tolist() == test["label"].tolist()
    assert sys.modules["kd_core.serving"] is ours and "kd_core.served_before" not in sys.modules


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@kd.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@kd.invalid"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_git_commit_marks_and_distinguishes_uncommitted_code(tmp_path: Path):
    outside = [provenance.git_commit(tmp_path) for _ in range(2)]  # not a git repository
    assert all(c.startswith("unknown-commit-") for c in outside) and outside[0] != outside[1]
    for name in ("code.py", "dvc.lock", "params.yaml"):
        (tmp_path / name).write_text("v1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "c")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert provenance.git_commit(tmp_path) == head

    (tmp_path / "dvc.lock").write_text("v2\n")  # written by the pipeline: not a code change
    (tmp_path / "params.yaml").write_text("v2\n")
    assert provenance.git_commit(tmp_path) == head

    (tmp_path / "code.py").write_text("v2\n")
    first = provenance.git_commit(tmp_path)
    (tmp_path / "code.py").write_text("v3\n")
    second = provenance.git_commit(tmp_path)
    assert first.startswith(f"{head}-dirty.") and second.startswith(f"{head}-dirty.") and first != second

    (tmp_path / "venv").mkdir()  # an untracked link to a directory (a shared .venv) is its target's name
    (tmp_path / ".venv").symlink_to(tmp_path / "venv")
    linked = provenance.git_commit(tmp_path)
    assert linked.startswith(f"{head}-dirty.") and linked != second


def test_an_unreadable_identity_never_matches_another_candidate(tmp_path: Path):
    """No git and no cache manifest: the identity tags are marked unknown, uniquely, so the idempotence
    check can never take a different candidate for an already registered one (they were constants)."""
    prepared = tmp_path / PARAMS.paths.prepared
    data.write_prepared(data.Splits(*(pd.DataFrame({"f0": [1.0], "label": [0]}),) * 3,
                                    data.Schema(("f0",), "label", (0,))), prepared)
    a, b = provenance.fingerprints(tmp_path, PARAMS), provenance.fingerprints(tmp_path, PARAMS)
    assert a.cache_key.startswith("unknown-cache-") and a.git_commit.startswith("unknown-commit-")
    assert a.identity() != b.identity() and a.data_fingerprint == b.data_fingerprint


@pytest.mark.slow
def test_concurrent_identical_registrations_register_once(root: Path):
    """The file lock serializes the idempotence check: two racing processes make one version."""
    script = ("import sys; from pathlib import Path; from kd_core.config import Params; "
              "from kd_core.stages import register; print(register.run(Params(), Path(sys.argv[1])).summary())")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]

    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    summaries = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert [" promoted " in s for s in summaries].count(True) == 1
    assert [" unchanged " in s for s in summaries].count(True) == 1
    assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_class_names(root: Path):
    register.run(PARAMS, root)
    port = free_port()
    log = (root / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
         "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
        cwd=root, env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, (root / "serve.log").read_text()
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(0.5)
        test = pd.read_parquet(root / PARAMS.paths.prepared / "test.parquet").head(6)
        raw = test.drop(columns=["label"])[["f2", "f0", "f3", "f1"]]
        body = json.dumps({"dataframe_split": raw.to_dict(orient="split")}).encode()
        req = urllib.request.Request(f"{base}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
        assert answer == {"predictions": test["label"].tolist()}
    finally:  # SIGTERM lets the CLI take its uvicorn child down with it (MLflow sets PDEATHSIG)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


@pytest.mark.slow
def test_registered_model_loads_without_this_checkout(root: Path):
    """code_paths carries kd_core: load in a process that cannot import this repo's kd_core."""
    register.run(PARAMS, root)
    script = (
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]\n"
        "sys.path = [p for p in sys.path if p not in ('', '.')]\n"
        "import mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "import kd_core\n"
        "print(kd_core.__file__)\n"
        "print(list(m.predict(pd.DataFrame([[3.0, 0, 0, 0]], columns=['f0', 'f1', 'f2', 'f3']))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    where, prediction = out.stdout.strip().splitlines()[-2:]
    assert "/code/kd_core/" in where and Path(__file__).resolve().parents[2].as_posix() not in where
    assert prediction == "['cat']"
