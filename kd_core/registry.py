"""Everything MLflow: the DAG run's record, live metrics, the served model, registration, promotion.

This is the only kd_core module that imports mlflow. The promotion policy (`decide_promotion`) is a
pure function; `register_candidate` gathers the evidence, asks the policy and writes the outcome to
the registry, the model version last, so a failure never leaves a half-registered candidate.
Nothing here runs at import time: the tracking URI is resolved per call from the project root.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import filelock
import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from kd_core import data, models
from kd_core.config import Params, PolicyParams
from kd_core.errors import TransientError, UserError

RUN_ID_ENV = "MLFLOW_RUN_ID"  # set by `kd run` for every stage process; absent under plain `dvc repro`
CHAMPION, CHALLENGER = "champion", "challenger"
ACCURACY = "accuracy"  # the eval.json key the policy reads; the same name everywhere
RULES = ("teacher_retention", "gain_over_baseline", "gain_over_champion")
IDENTITY_TAGS = ("data_fingerprint", "cache_key", "params_hash", "git_commit")
MODEL_ARTIFACT = "kd_model"  # name of the kd model directory inside the pyfunc model's artifacts
MODEL_NAME_IN_RUN = "model"
OUTPUTS = ("classes", "probabilities")  # what predict(params={"output": ...}) can return
SERVING_PACKAGES = ("torch", "safetensors", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml")
NOT_IN_GIT = ("dvc.lock", "params.yaml")  # written by the pipeline itself; covered by other hashes
LOCK_TIMEOUT_S = 600.0  # a registration takes seconds; ten minutes means a stuck process
PROBE_TIMEOUT_S = 5.0
_EPS = 1e-9  # accuracies are ratios of counts: 0.3 - 0.2 must still reach a 0.1 threshold

# models-from-code: MLflow runs this file to get the model, so loading one never unpickles anything
_MODEL_CODE = '''"""MLflow model code for a kd student (see kd_core/registry.py)."""
import mlflow

from kd_core.registry import KDPyfuncModel

mlflow.models.set_model(KDPyfuncModel())
'''


class TrackingUnavailable(TransientError):
    """The tracking server or store did not answer; worth retrying after a pause."""


# --- where the record lives -----------------------------------------------------------------------

def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the project's own sqlite store (absolute, so any cwd agrees)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    """One client per URI: opening a sqlite store checks its schema, too slow to do every epoch."""
    return MlflowClient(tracking_uri=uri)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts next to a sqlite store (MLflow's default is ./mlruns of whatever the cwd is)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides where its artifacts go
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns" / _key(experiment)).as_uri()


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException as exc:  # another process created it in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage != "active":
        raise UserError(f"MLflow experiment {name!r} is deleted; restore it or set registry.experiment")
    return exp.experiment_id


def check_tracking(root: Path) -> None:
    """Fail fast with TrackingUnavailable when a tracking server is down.

    MLflow's own client retries a dead server for minutes; one short probe lets the caller choose
    its own backoff. Any HTTP answer (even 401/404) means the server is up.
    """
    uri = tracking_uri(root)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return  # it answered; TLS settings are MLflow's (MLFLOW_TRACKING_INSECURE_TLS, …)
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {reason}") from None


@contextmanager
def _tracking_errors(uri: str) -> Iterator[None]:
    """Turn MLflow's connection failures into TrackingUnavailable, one line naming the store."""
    try:
        yield
    except MlflowException as exc:
        line = (str(exc).splitlines() or [""])[0]
        if line.startswith("API request to") or "database is locked" in line:
            raise TrackingUnavailable(f"MLflow at {uri} is unavailable: {line[:300]}") from None
        raise


# --- flattening for params, tags and metrics ------------------------------------------------------

def _key(name: str) -> str:
    """MLflow keys allow word characters, '-', '.', ' ' and '/'; DVC's 'stage@item' needs this."""
    return re.sub(r"[^\w\-. /]", "_", name)


def _flatten(obj: Any, prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """Nested dicts (and, with `lists`, lists by index) to dotted keys: {'train.lr': 0.002}."""
    if isinstance(obj, dict):
        items = obj.items()
    elif lists and isinstance(obj, list):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k), lists))
    return out


def flat_params(params: Params) -> dict[str, str]:
    """params.yaml as MLflow params: dotted keys, JSON values, cut to MLflow's length limit."""
    flat = _flatten(params.model_dump(mode="json"))
    values = {_key(k): v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}
    return {k: v if len(v) <= MAX_PARAM_VAL_LENGTH else v[:MAX_PARAM_VAL_LENGTH - 1] + "…"
            for k, v in values.items()}


def flat_metrics(obj: dict) -> dict[str, float]:
    """Every finite number in eval.json under its path: {'student.accuracy': 0.93, …}."""
    return {_key(k): float(v) for k, v in _flatten(obj, lists=True).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _log_params(client: MlflowClient, run_id: str, flat: dict[str, str]) -> None:
    """Log the params the run lacks (MLflow params are write-once), in MLflow's batch size."""
    have = client.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(todo), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=todo[i:i + MAX_PARAMS_TAGS_PER_BATCH])


# --- the DAG run and live metrics -----------------------------------------------------------------

def start_dag_run(root: Path, params: Params) -> str:
    """Create the one run that records a DAG run; `kd run` hands its id to stages as MLFLOW_RUN_ID."""
    uri = tracking_uri(root)
    client = _client(uri)
    with _tracking_errors(uri):
        run = client.create_run(_experiment_id(client, params.registry.experiment, uri),
                                tags={"params_hash": params.digest(), "git_commit": git_commit(root)})
        _log_params(client, run.info.run_id, flat_params(params))
    return run.info.run_id


def end_dag_run(root: Path, run_id: str, status: str) -> None:
    """Close the DAG run with FINISHED, FAILED or KILLED (the `register` stage may have set one)."""
    uri = tracking_uri(root)
    with _tracking_errors(uri):
        _client(uri).set_terminated(run_id, status=status)


def log_epoch_metrics(root: Path, metrics: dict[str, float], step: int) -> None:
    """Send one epoch's metrics to the DAG run; a no-op without MLFLOW_RUN_ID (plain `dvc repro`).

    Asynchronous: training never waits on the tracking store, and MLflow flushes at exit.
    """
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id or not metrics:
        return
    ts = int(time.time() * 1000)
    batch = [Metric(_key(k), float(v), ts, step) for k, v in metrics.items()]
    _client(tracking_uri(root)).log_batch(run_id, metrics=batch, synchronous=False)


# --- the served model -----------------------------------------------------------------------------

def predict_frame(model: models.KDModel, schema: data.Schema, frame: pd.DataFrame,
                  output: str = "classes") -> np.ndarray | pd.DataFrame:
    """Raw rows (columns by name, any order, extras ignored) -> class names or probabilities."""
    if output not in OUTPUTS:
        raise UserError(f"unknown output {output!r}; choose one of {list(OUTPUTS)}")
    missing = [c for c in schema.features if c not in frame.columns]
    if missing:
        raise UserError(f"input lacks feature column(s) {missing[:5]} ({len(missing)} of the "
                        f"{len(schema.features)} the model reads)")
    logits = models.predict_logits(model, data.features_array(frame, schema))
    logits = logits.reshape(len(frame), len(schema.classes))  # (N, K), also when N == 0
    if output == "probabilities":
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()  # (N, K)
        return pd.DataFrame(probs, columns=[str(c) for c in schema.classes])
    return np.asarray(schema.classes, dtype=object)[logits.argmax(axis=1)]  # (N,) class names


class KDPyfuncModel(mlflow.pyfunc.PythonModel):
    """A kd model directory served on raw rows; answers class names (or probabilities on request)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self._model, self._spec = models.load(Path(context.artifacts[MODEL_ARTIFACT]))

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray | pd.DataFrame:
        output = (params or {}).get("output", "classes")
        return predict_frame(self._model, self._spec.schema, model_input, output)


def _requirement(package: str) -> str:
    """`package==version` as installed (local tags like +cpu dropped), so serving builds the same env."""
    return f"{package}=={version(package).split('+')[0]}"


def _input_example(test: pd.DataFrame, features: tuple[str, ...]) -> pd.DataFrame:
    """A few raw test rows; float columns as double, since JSON numbers arrive as float64 and
    MLflow's schema check refuses float64 -> float32 (it does accept float32 -> double)."""
    rows = test[list(features)].head(5)
    return rows.astype({c: "float64" for c in features if rows[c].dtype.kind == "f"})


def _log_model(model_dir: Path, test: pd.DataFrame) -> str:
    """Log `model_dir` as a pyfunc into the active run; returns the model URI to register."""
    model, spec = models.load(model_dir)
    example = _input_example(test, spec.schema.features)
    classes = predict_frame(model, spec.schema, example).tolist()
    signature = infer_signature(example, classes, params={"output": OUTPUTS[0]})
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "kd_pyfunc_model.py"
        code.write_text(_MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN, python_model=str(code), artifacts={MODEL_ARTIFACT: str(model_dir)},
            code_paths=[str(Path(__file__).resolve().parent)], signature=signature,
            input_example=example, pip_requirements=[_requirement(p) for p in SERVING_PACKAGES])
    return info.model_uri


def download_model_dir(uri: str, dest: Path, root: Path | None = None) -> Path:
    """Fetch a kd model directory from an MLflow URI: a model kd registered, or a logged model dir.

    `root` is the project root (for the default tracking store); the cwd when not given. `dest` is
    scratch space, emptied first so no earlier download can be mistaken for this one.
    """
    mlflow.set_tracking_uri(tracking_uri(root or Path.cwd()))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except MlflowException as exc:
        raise UserError(f"{uri}: cannot download from MLflow: {str(exc).splitlines()[0]}") from None
    if (local / models.META_FILE).exists():
        return local
    if (local / "MLmodel").exists():  # a pyfunc kd logged: the directory is one of its artifacts
        flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
        entry = flavor.get("artifacts", {}).get(MODEL_ARTIFACT)
        if entry and (local / entry["path"] / models.META_FILE).exists():
            return local / entry["path"]
    raise UserError(f"{uri} holds no kd model directory (no {models.META_FILE}); "
                    "give a model kd registered or a logged kd model directory")


# --- the promotion policy (pure) ------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    decision: Literal["promoted", "rejected"]
    reasons: tuple[str, ...]  # one per rule, in RULES order: "rule value >= threshold: pass|fail"


def _accuracy(metrics: dict, role: str) -> float:
    """The role's accuracy from eval.json; missing or malformed is an error, never a silent 0."""
    if ACCURACY not in metrics:
        raise UserError(f"{role} metrics lack {ACCURACY!r} (have {sorted(metrics)[:8]})")
    value = metrics[ACCURACY]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise UserError(f"{role} {ACCURACY} must be a fraction in [0, 1], got {value!r}")
    return float(value)


def _rule(name: str, value: float, threshold: float) -> tuple[bool, str]:
    ok = value >= threshold - _EPS
    return ok, f"{name} {value:.4f} >= {threshold:.4f}: {'pass' if ok else 'fail'}"


def decide_promotion(candidate: dict, teacher: dict, baseline: dict, champion_accuracy: float | None,
                     policy: PolicyParams) -> Decision:
    """Promote only if every rule passes: the student keeps enough of the teacher, beats the
    hard-label baseline (KD helped) and, if a champion exists, beats it on today's test set."""
    student = _accuracy(candidate, "student")
    teacher_acc, baseline_acc = _accuracy(teacher, "teacher"), _accuracy(baseline, "baseline")
    checks = [
        _rule(RULES[0], student / teacher_acc, policy.min_teacher_retention) if teacher_acc > 0
        else (False, f"{RULES[0]} undefined (teacher {ACCURACY} 0.0000): fail"),
        _rule(RULES[1], student - baseline_acc, policy.min_gain_over_baseline),
        _rule(RULES[2], student - champion_accuracy, policy.min_gain_over_champion)
        if champion_accuracy is not None else (True, f"{RULES[2]} n/a (no champion): pass"),
    ]
    decision = "promoted" if all(ok for ok, _ in checks) else "rejected"
    return Decision(decision, tuple(reason for _, reason in checks))


# --- fingerprints ---------------------------------------------------------------------------------

def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=True).stdout


def git_commit(root: Path) -> str:
    """HEAD, or HEAD-dirty.<digest> with uncommitted changes, or 'unknown' outside git.

    The digest of the changes keeps two different uncommitted edits from looking identical to the
    idempotence check. dvc.lock and params.yaml are left out: the pipeline writes them itself and
    the data/cache/params hashes already cover them.
    """
    try:
        head = _git(root, "rev-parse", "HEAD").strip()
        excludes = [f":(exclude){p}" for p in NOT_IN_GIT]
        diff = _git(root, "diff", "HEAD", "--binary", "--", ".", *excludes)
        untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z", "--", ".", *excludes)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not diff and not untracked:
        return head
    h = hashlib.sha256(diff.encode())
    for name in sorted(filter(None, untracked.split("\0"))):
        h.update(name.encode())
        h.update(hashlib.sha256((root / name).read_bytes()).digest())
    return f"{head}-dirty.{h.hexdigest()[:12]}"


@dataclass(frozen=True)
class Fingerprints:
    data_fingerprint: str
    cache_key: str
    params_hash: str
    git_commit: str
    teacher_fingerprint: str | None

    def identity(self) -> dict[str, str]:
        """The tags that make two candidates the same candidate (ARCHITECTURE: idempotent register)."""
        return {k: getattr(self, k) for k in IDENTITY_TAGS}

    def tags(self) -> dict[str, str]:
        extra = {"teacher_fingerprint": self.teacher_fingerprint} if self.teacher_fingerprint else {}
        return {**self.identity(), **extra}


def fingerprints(root: Path, params: Params) -> Fingerprints:
    manifest_path = root / params.paths.logits / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return Fingerprints(data.data_fingerprint(root / params.paths.prepared), str(manifest.get("key", "none")),
                        params.digest(), git_commit(root), manifest.get("teacher_fingerprint"))


def dvc_stage_hashes(root: Path) -> dict[str, str]:
    """sha256 of each stage's dvc.lock entry (its deps, params and outs): `dvc.<stage>` tags."""
    path = root / "dvc.lock"
    if not path.exists():
        return {}
    try:
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return {_key(f"dvc.{name}"): hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode())
            .hexdigest() for name, entry in stages.items()}


# --- registration ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegisterOutcome:
    decision: Literal["promoted", "rejected"]
    reasons: tuple[str, ...]
    model_name: str
    version: int
    aliases: tuple[str, ...]
    run_id: str | None  # None when an identical version already existed and nothing was logged
    unchanged: bool

    def to_json(self) -> dict:
        """metrics/register.json (ARCHITECTURE output contract)."""
        return {"decision": self.decision, "reasons": list(self.reasons), "model_name": self.model_name,
                "version": self.version, "aliases": list(self.aliases)}


@dataclass(frozen=True)
class _Evidence:
    evals: dict  # eval.json
    test: pd.DataFrame  # the prepared test split, labels included
    label_column: str
    fingerprints: Fingerprints


def _read_eval(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path} not found: run the evaluate stage first")
    try:
        evals = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON: {exc}") from None
    missing = [r for r in ("teacher", "student", "baseline") if not isinstance(evals.get(r), dict)]
    if missing:
        raise UserError(f"{path}: lacks the {missing} section(s)")
    return evals


def _evidence(root: Path, params: Params) -> _Evidence:
    evals = _read_eval(root / params.paths.metrics / "eval.json")
    splits = data.read_prepared(root / params.paths.prepared)
    if len(splits.test) == 0:
        raise UserError(f"{root / params.paths.prepared}: the test split is empty")
    return _Evidence(evals, splits.test, splits.schema.label_column, fingerprints(root, params))


def _identical_version(client: MlflowClient, name: str, fp: Fingerprints) -> ModelVersion | None:
    """The newest version registered from exactly these inputs, if any."""
    query = " AND ".join([f"name = '{name}'", *(f"tags.{k} = '{v}'" for k, v in fp.identity().items())])
    found = client.search_model_versions(query)
    return max(found, key=lambda mv: int(mv.version)) if found else None


def _recorded(client: MlflowClient, name: str, mv: ModelVersion) -> RegisterOutcome:
    mv = client.get_model_version(name, mv.version)  # search results carry no aliases
    reasons = [mv.tags[f"reason.{r}"] for r in RULES if f"reason.{r}" in mv.tags]
    return RegisterOutcome(mv.tags["decision"], (f"unchanged: identical to version {mv.version}", *reasons),
                           name, int(mv.version), tuple(sorted(mv.aliases)), None, True)


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def score_model(model_uri: str, test: pd.DataFrame, label_column: str) -> float:
    """Accuracy of a registered model on raw test rows, through MLflow's own loading path."""
    saved_path = list(sys.path)  # loading prepends the model's code dir; keep this process's imports
    try:
        model = mlflow.pyfunc.load_model(model_uri)
        predictions = np.asarray(model.predict(test.drop(columns=[label_column])), dtype=object)
    except (MlflowException, UserError) as exc:
        text = str(exc)  # MLflow's schema errors open with a dump of the input; the cause ends them
        cause = text.rsplit("Error: ", 1)[-1] if "Error: " in text else text
        raise UserError(f"{model_uri} cannot score the current test set: {cause.splitlines()[0]}; "
                        "remove its alias if the data changed shape") from None
    finally:
        sys.path[:] = saved_path
    return float(np.mean(predictions == test[label_column].to_numpy(dtype=object)))


def _target_run(client: MlflowClient, experiment: str, uri: str) -> str:
    """The DAG run named by MLFLOW_RUN_ID, else a new run in `experiment` (plain `dvc repro`)."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id:
        return client.create_run(_experiment_id(client, experiment, uri)).info.run_id
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"{RUN_ID_ENV}={run_id} is not a run in {uri}") from None
    return run_id


def _record_run(client: MlflowClient, run_id: str, root: Path, params: Params, ev: _Evidence,
                extra_metrics: dict[str, float]) -> str:
    """Make the active run hold params, dvc.lock, git commit, metrics, reports and the model.

    Returns the logged model's URI, for registration.
    """
    _log_params(client, run_id, flat_params(params))
    tags = {**ev.fingerprints.tags(), **dvc_stage_hashes(root)}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    ts = int(time.time() * 1000)
    metrics = {**flat_metrics(ev.evals), **extra_metrics}
    client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
    if (root / "dvc.lock").exists():
        client.log_artifact(run_id, str(root / "dvc.lock"))
    if (root / params.paths.validation).is_dir():
        client.log_artifacts(run_id, str(root / params.paths.validation), params.paths.validation)
    client.log_artifact(run_id, str(root / params.paths.metrics / "eval.json"), params.paths.metrics)
    return _log_model(root / params.paths.student, ev.test)


def _new_version(client: MlflowClient, name: str, model_uri: str, decision: Decision, fp: Fingerprints,
                 champion: ModelVersion | None) -> ModelVersion:
    """Register the version with its evidence as tags, then move the aliases."""
    tags = {"decision": decision.decision, **fp.tags(),
            **{f"reason.{r}": reason for r, reason in zip(RULES, decision.reasons, strict=True)}}
    mv = mlflow.register_model(model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    if decision.decision == "promoted":
        if champion is not None:
            client.set_model_version_tag(name, champion.version, "successor", str(mv.version))
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return client.get_model_version(name, mv.version)


def register_candidate(root: Path, params: Params) -> RegisterOutcome:
    """Register the evaluated student unless an identical candidate exists; apply the policy.

    Serialized by a file lock under `paths.work`, so two registrations never race for `champion`.
    Uses the DAG run from MLFLOW_RUN_ID, else creates a run in `registry.experiment`.
    """
    root = Path(root).resolve()
    uri, name = tracking_uri(root), params.registry.model_name
    ev = _evidence(root, params)
    lock_path = root / params.paths.work / "register.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)  # the fluent calls (log, load, register) must use the same store
    client = _client(uri)
    try:
        with filelock.FileLock(lock_path, timeout=LOCK_TIMEOUT_S), _tracking_errors(uri):
            same = _identical_version(client, name, ev.fingerprints)
            if same is not None:
                return _recorded(client, name, same)
            champion = _champion(client, name)
            champion_acc = (score_model(f"models:/{name}/{champion.version}", ev.test, ev.label_column)
                            if champion is not None else None)
            decision = decide_promotion(ev.evals["student"], ev.evals["teacher"], ev.evals["baseline"],
                                        champion_acc, params.policy)
            run_id = _target_run(client, params.registry.experiment, uri)
            extra = {f"{CHAMPION}.{ACCURACY}": champion_acc} if champion_acc is not None else {}
            # as the active run: a failure marks it FAILED, success FINISHED (then end_dag_run decides)
            with mlflow.start_run(run_id=run_id):
                model_uri = _record_run(client, run_id, root, params, ev, extra)
                mv = _new_version(client, name, model_uri, decision, ev.fingerprints, champion)
    except filelock.Timeout:
        raise UserError(f"{lock_path}: another registration has held the lock for "
                        f"{LOCK_TIMEOUT_S:.0f} s") from None
    return RegisterOutcome(decision.decision, decision.reasons, name, int(mv.version),
                           tuple(sorted(mv.aliases)), run_id, False)
