"""Everything MLflow: the DAG run's record, live metrics, the served model, registration, promotion.

This is the only kd_core module that imports mlflow. The promotion policy (`decide_promotion`) is a
pure function; `register_candidate` gathers the evidence (eval.json, and the champion and candidate
scored on the same test rows), asks the policy and writes the outcome to the registry, the model
version last, so a failure never leaves a half-registered candidate. Every move of the `champion`
alias (policy, `kd promote`, `kd rollback`) happens under `registry_lock`, re-reads the champion
there, and leaves an audit entry. Nothing here runs at import time: the tracking URI is resolved per
call from the project root.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import json
import math
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
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
ACCURACY, PER_CLASS = "accuracy", "per_class_accuracy"  # eval.json keys the policy reads; the same
LATENCY, SIZE = "latency_ms_p50", "size_bytes"              # names everywhere (eval.json, MLflow, tags)
RULES = ("teacher_retention", "gain_over_baseline", "latency_ratio", "size_bytes", "class_drop",
         "gain_over_champion", "champion_p_value")
IDENTITY_TAGS = ("data_fingerprint", "cache_key", "params_hash", "git_commit")
MODEL_ARTIFACT = "kd_model"  # name of the kd model directory inside the pyfunc model's artifacts
MODEL_NAME_IN_RUN = "model"
OUTPUTS = ("classes", "probabilities")  # what predict(params={"output": ...}) can return
SERVING_PACKAGES = ("torch", "safetensors", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml")
NOT_IN_GIT = ("dvc.lock", "params.yaml")  # written by the pipeline itself; covered by other hashes
LOCK_LEASE_S = 600.0  # a registration takes seconds; a lock held ten minutes belongs to a dead process
LOCK_TIMEOUT_S = 900.0  # a waiter outlasts one full lease, then gives up with one line
LOCK_POLL_S = 0.5
HISTORY_TAG, AUDIT_PREFIX = "champion_history", "audit."  # registered-model tags kd keeps
MAX_HISTORY, MAX_REASON = 200, 500  # keep tags well inside the store's column sizes
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
    """One client per URI: opening a sqlite store checks its schema, too slow to do every epoch.

    MLflow creates a new sqlite store's schema on first use, and two processes doing it at once fail
    (`duplicate column name`); so the first use of a sqlite store happens under a file lock.
    """
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    with filelock.FileLock(_lock_path(uri, "#schema-init"), timeout=LOCK_TIMEOUT_S):
        client = MlflowClient(tracking_uri=uri)  # opens (creates, migrates) the tracking store
        client.search_registered_models(max_results=1)  # the registry store opens the same file
    return client


def _lock_path(uri: str, name: str) -> Path:
    """A lock file for `name` on a sqlite store, in the temp dir: beside the store git would see it."""
    store = f"{Path(uri.removeprefix('sqlite:///')).resolve()}:{name}"
    return Path(tempfile.gettempdir()) / f"kd-register-{hashlib.sha256(store.encode()).hexdigest()[:16]}.lock"


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
    reasons: tuple[str, ...]  # one per rule, in RULES order: "rule value <= or >= threshold: pass|fail"


@dataclass(frozen=True)
class ChampionScore:
    """The champion and the candidate scored on the same rows of today's test split (paired)."""

    version: int
    accuracy: float  # the champion's accuracy on today's test rows, not its old metrics
    per_class_accuracy: dict[str, float]  # the champion's, keyed by class name like eval.json
    wins: int  # rows the candidate classifies right and the champion wrong
    losses: int  # rows the champion classifies right and the candidate wrong


def paired_score(version: int, candidate: np.ndarray, champion: np.ndarray, labels: np.ndarray) -> ChampionScore:
    """Row-by-row comparison of two models' predicted class names against the true labels, (N,) each."""
    y = np.asarray(labels, dtype=object)
    cand_ok = np.asarray(candidate, dtype=object) == y  # (N,) bool
    champ_ok = np.asarray(champion, dtype=object) == y  # (N,) bool
    per_class = {str(c): float(champ_ok[y == c].mean()) for c in pd.unique(y)}
    return ChampionScore(version, float(champ_ok.mean()) if len(y) else 0.0, per_class,
                         int((cand_ok & ~champ_ok).sum()), int((~cand_ok & champ_ok).sum()))


def mcnemar_p_value(wins: int, losses: int) -> float:
    """One-sided exact McNemar test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2).

    Only the discordant rows carry information about which of two models is more accurate on the
    same rows; if both were equally accurate each of them would be a coin flip (McNemar 1947; the
    exact binomial form is the one to use when discordant rows are few). 1.0 when there are none.
    """
    n = wins + losses
    if n == 0:
        return 1.0
    log_terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
                 for k in range(wins, n + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in log_terms))


def _number(metrics: dict, key: str, role: str, lo: float = 0.0, hi: float = math.inf) -> float:
    """A metric from eval.json; missing or malformed is an error, never a silent 0."""
    if key not in metrics:
        raise UserError(f"{role} metrics lack {key!r} (have {sorted(metrics)[:8]})")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        what = "a fraction in [0, 1]" if (lo, hi) == (0.0, 1.0) else f"a number >= {lo:g}"
        raise UserError(f"{role} {key} must be {what}, got {value!r}")
    return float(value)


def _accuracy(metrics: dict, role: str) -> float:
    return _number(metrics, ACCURACY, role, 0.0, 1.0)


def _per_class(metrics: dict, role: str) -> dict[str, float]:
    value = metrics.get(PER_CLASS)
    if not isinstance(value, dict):
        raise UserError(f"{role} metrics lack {PER_CLASS!r} (a mapping of class name to accuracy)")
    return {str(c): _number(value, c, f"{role} {PER_CLASS}", 0.0, 1.0) for c in value}


def _at_least(name: str, value: float, threshold: float, detail: str = "") -> tuple[bool, str]:
    ok = value >= threshold - _EPS
    return ok, f"{name} {value:.4f}{detail} >= {threshold:.4f}: {'pass' if ok else 'fail'}"


def _at_most(name: str, value: float, threshold: float, detail: str = "", fmt: str = ".4f") -> tuple[bool, str]:
    ok = value <= threshold + _EPS
    return ok, f"{name} {value:{fmt}}{detail} <= {threshold:{fmt}}: {'pass' if ok else 'fail'}"


def _champion_checks(candidate: dict, student: float, champion: ChampionScore,
                     policy: PolicyParams) -> list[tuple[bool, str]]:
    mine = _per_class(candidate, "student")
    missing = sorted(set(champion.per_class_accuracy) - set(mine))
    if missing:
        raise UserError(f"student {PER_CLASS} lacks class(es) {missing[:5]} of today's test split")
    drops = {c: acc - mine[c] for c, acc in champion.per_class_accuracy.items()}  # > 0: the class got worse
    worst = max(drops, key=lambda c: drops[c])
    p = mcnemar_p_value(champion.wins, champion.losses)
    vs = f" vs version {champion.version}"
    return [
        _at_most(RULES[4], drops[worst], policy.max_class_drop, f" (class {worst}{vs})"),
        _at_least(RULES[5], student - champion.accuracy, policy.min_gain_over_champion, vs),
        _at_most(RULES[6], p, policy.max_p_value, f" ({champion.wins} wins, {champion.losses} losses{vs})"),
    ]


def decide_promotion(candidate: dict, teacher: dict, baseline: dict, champion: ChampionScore | None,
                     policy: PolicyParams) -> Decision:
    """Promote only if every rule passes, in RULES order:

    the student keeps enough of the teacher's accuracy; beats the hard-label baseline (KD helped); is
    fast enough next to the teacher (latencies measured in one process, so machine noise cancels) and
    small enough; and, when a champion exists (scored on today's test rows, paired with the student),
    loses no class by more than the margin, beats it by at least epsilon, and the win is significant.
    """
    student = _accuracy(candidate, "student")
    teacher_acc, baseline_acc = _accuracy(teacher, "teacher"), _accuracy(baseline, "baseline")
    latency, teacher_latency = _number(candidate, LATENCY, "student"), _number(teacher, LATENCY, "teacher")
    size = _number(candidate, SIZE, "student")
    checks = [
        _at_least(RULES[0], student / teacher_acc, policy.min_teacher_retention) if teacher_acc > 0
        else (False, f"{RULES[0]} undefined (teacher {ACCURACY} 0.0000): fail"),
        _at_least(RULES[1], student - baseline_acc, policy.min_gain_over_baseline),
        _at_most(RULES[2], latency / teacher_latency, policy.max_latency_ratio) if teacher_latency > 0
        else (False, f"{RULES[2]} undefined (teacher {LATENCY} 0): fail"),
        _at_most(RULES[3], size, policy.max_size_bytes, fmt=".0f") if policy.max_size_bytes is not None
        else (True, f"{RULES[3]} n/a (no limit): pass"),
        *(_champion_checks(candidate, student, champion, policy) if champion is not None
          else [(True, f"{rule} n/a (no champion): pass") for rule in RULES[4:]]),
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
    """With several teachers the cache key and teacher fingerprint join each member's, in order."""
    paths = [root / d / "manifest.json" for d in params.logit_dirs()]
    manifests = [json.loads(p.read_text()) if p.exists() else {} for p in paths]
    keys = [str(m.get("key", "none")) for m in manifests]
    teachers = [m.get("teacher_fingerprint") for m in manifests]
    if len(manifests) == 1:
        key, teacher = keys[0], teachers[0]
    else:
        key = hashlib.sha256("+".join(keys).encode()).hexdigest()
        teacher = hashlib.sha256("+".join(map(str, teachers)).encode()).hexdigest() if all(teachers) else None
    return Fingerprints(data.data_fingerprint(root / params.paths.prepared), key, params.digest(), git_commit(root),
                        teacher)


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


# --- serialized alias moves -----------------------------------------------------------------------

def current_user() -> str:
    """`user@host` for audit tags."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container without a passwd entry
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"


def _now_ms() -> int:
    return int(time.time() * 1000)


class _RegistryLock:
    """A lock that every machine sharing the MLflow store sees: the registered model `<name>.lock`.

    MLflow has no compare-and-swap on tags, but creating a registered model is atomic: the name is the
    table's unique key, so of racing creators (through one server or several, on sqlite or PostgreSQL)
    exactly one succeeds and the rest get RESOURCE_ALREADY_EXISTS. The lock's tags say who holds it and
    until when. A lock past its lease belongs to a dead process and is broken by renaming it to
    `<name>.lock.broken.<token>`: that name can be taken once, so two breakers cannot both win, and a
    late breaker cannot break the next holder's lock. Clocks must agree to well within the lease (NTP).
    """

    def __init__(self, client: MlflowClient, name: str, lease_s: float, timeout_s: float) -> None:
        self.client, self.name = client, f"{name}.lock"
        self.lease_s, self.timeout_s = lease_s, timeout_s
        self.token: str | None = None

    def _held(self) -> dict[str, str] | None:
        try:
            rm = self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        expires = rm.tags.get("expires_at") or str(rm.creation_timestamp + int(self.lease_s * 1000))
        return {**rm.tags, "expires_at": expires}

    def _break(self, token: str) -> None:
        try:
            self.client.rename_registered_model(self.name, f"{self.name}.broken.{token}")
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise  # else another waiter broke it first, or the holder released it

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            token, now = uuid.uuid4().hex, _now_ms()
            tags = {"token": token, "holder": f"{current_user()} pid {os.getpid()}",
                    "acquired_at": str(now), "expires_at": str(now + int(self.lease_s * 1000))}
            try:
                self.client.create_registered_model(self.name, tags=tags,
                                                    description="kd: registration lock (see kd_core/registry.py)")
                self.token = token
                return
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            held = self._held()
            if held is not None and int(held["expires_at"]) < _now_ms():
                self._break(held.get("token", "unknown"))
                continue
            if time.monotonic() > deadline:
                who = held.get("holder", "an unknown process") if held else "another process"
                raise UserError(f"registry lock {self.name} is held by {who}; gave up after {self.timeout_s:.0f} s")
            time.sleep(LOCK_POLL_S)

    def release(self) -> None:
        held = self._held()
        if held is not None and held.get("token") == self.token:
            with contextlib.suppress(MlflowException):  # gone already: broken after an overrun lease
                self.client.delete_registered_model(self.name)


@contextmanager
def registry_lock(uri: str, name: str, lease_s: float = LOCK_LEASE_S,
                  timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialize everything that reads and moves `name`'s aliases: registration, promote, rollback.

    A sqlite store is a file on one machine: an OS file lock (released even if the process dies) in
    the temp dir, named after the store, not beside it where git would see a new untracked file and
    the code fingerprint would change. Any other store (an MLflow server, PostgreSQL, ...) is shared
    by machines: _RegistryLock.
    """
    if uri.startswith("sqlite:///"):
        path = _lock_path(uri, name)
        try:
            with filelock.FileLock(path, timeout=timeout_s):
                yield
        except filelock.Timeout:
            raise UserError(f"{path}: another registration has held the lock for {timeout_s:.0f} s") from None
        return
    lock = _RegistryLock(_client(uri), name, lease_s, timeout_s)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _history(client: MlflowClient, name: str) -> list[int]:
    """Versions that held `champion`, oldest first (a registered-model tag kd keeps)."""
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [int(v) for v in raw.split(",") if v.strip().isdigit()]


def _audit(client: MlflowClient, name: str, entry: dict[str, Any]) -> None:
    """Append one entry to the registered model's audit trail: tags audit.000001, audit.000002, ..."""
    seqs = [int(k.removeprefix(AUDIT_PREFIX)) for k in client.get_registered_model(name).tags
            if k.startswith(AUDIT_PREFIX) and k.removeprefix(AUDIT_PREFIX).isdigit()]
    client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{max(seqs, default=0) + 1:06d}",
                                    json.dumps(entry, sort_keys=True))


@dataclass(frozen=True)
class ChampionMove:
    """One move of the `champion` alias, as recorded in the audit trail."""

    model_name: str
    action: Literal["policy", "manual", "rollback"]
    champion: int
    previous: int | None
    by: str
    at: str
    reason: str

    def summary(self) -> str:
        was = f" (was version {self.previous})" if self.previous is not None else ""
        return (f"{self.model_name} version {self.champion} is champion{was}: {self.action} "
                f"by {self.by} at {self.at}: {self.reason}")


def _move_champion(client: MlflowClient, name: str, version: int, previous: int | None,
                   action: Literal["policy", "manual", "rollback"], by: str, reason: str,
                   history: list[int]) -> ChampionMove:
    """Point `champion` at `version`, then record who, when and why on the version and the model."""
    move = ChampionMove(name, action, version, previous, by,
                        datetime.now(UTC).isoformat(timespec="seconds"), reason[:MAX_REASON])
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if previous is not None and action != "rollback":
        client.set_model_version_tag(name, str(previous), "successor", str(version))
    for key, value in {"promotion": action, "promoted_by": by, "promoted_at": move.at,
                       "promotion_reason": move.reason}.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(map(str, history[-MAX_HISTORY:])))
    _audit(client, name, {"action": action, "champion": version, "previous": previous, "by": by,
                          "at": move.at, "reason": move.reason})
    return move


def _reason(reason: str) -> str:
    reason = " ".join(reason.split())
    if not reason:
        raise UserError("--reason is empty: say why, it goes into the audit trail")
    return reason


def promote(root: Path, params: Params, version: int, reason: str, by: str) -> ChampionMove:
    """`kd promote`: make `version` the champion by hand, overriding the policy; audited."""
    uri, name = tracking_uri(Path(root)), params.registry.model_name
    reason, client = _reason(reason), _client(uri)
    check_tracking(Path(root))
    with _tracking_errors(uri), registry_lock(uri, name):
        try:
            client.get_model_version(name, str(version))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise UserError(f"{name} has no version {version} in {uri}") from None
        champion = _champion(client, name)  # re-read under the lock
        if champion is not None and int(champion.version) == version:
            raise UserError(f"{name} version {version} is already the champion")
        previous = int(champion.version) if champion is not None else None
        history = [*_history(client, name), version]
        return _move_champion(client, name, version, previous, "manual", by, reason, history)


def _previous_champion(client: MlflowClient, name: str, current: int) -> tuple[int, list[int]] | None:
    """The champion before `current` and the history without `current` on top; None if there is none."""
    history = _history(client, name)
    while history and history[-1] == current:
        history.pop()
    while history:
        try:
            client.get_model_version(name, str(history[-1]))
            return history[-1], history
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            history.pop()  # deleted since: roll back past it
    before = client.search_model_versions(f"name = '{name}' AND tags.successor = '{current}'")
    if before:  # champions from before kd kept a history: follow the successor tags back
        v = max(int(mv.version) for mv in before)
        return v, [v]
    return None


def rollback(root: Path, params: Params, reason: str, by: str) -> ChampionMove:
    """`kd rollback`: move `champion` back to the previous champion; audited."""
    uri, name = tracking_uri(Path(root)), params.registry.model_name
    reason, client = _reason(reason), _client(uri)
    check_tracking(Path(root))
    with _tracking_errors(uri), registry_lock(uri, name):
        champion = _champion(client, name)  # re-read under the lock
        if champion is None:
            raise UserError(f"{name} has no champion in {uri}: nothing to roll back")
        current = int(champion.version)
        found = _previous_champion(client, name, current)
        if found is None:
            raise UserError(f"{name} version {current} has no previous champion to roll back to")
        previous, history = found
        for key, value in {"rolled_back_by": by, "rolled_back_at": datetime.now(UTC).isoformat(timespec="seconds"),
                           "rollback_reason": reason[:MAX_REASON]}.items():
            client.set_model_version_tag(name, str(current), key, value)
        return _move_champion(client, name, previous, current, "rollback", by, reason, history)


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
    eval_path: Path
    test: pd.DataFrame  # the prepared test split, labels included
    label_column: str
    fingerprints: Fingerprints

    @property
    def features(self) -> pd.DataFrame:
        return self.test.drop(columns=[self.label_column])

    @property
    def labels(self) -> np.ndarray:
        return self.test[self.label_column].to_numpy(dtype=object)  # (N,)


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
    path = root / params.paths.metrics / "eval.json"
    evals = _read_eval(path)
    splits = data.read_prepared(root / params.paths.prepared)
    if len(splits.test) == 0:
        raise UserError(f"{root / params.paths.prepared}: the test split is empty")
    return _Evidence(evals, path, splits.test, splits.schema.label_column, fingerprints(root, params))


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


@contextmanager
def _scoring(failure: str, hint: str) -> Iterator[None]:
    """Load and score a registered model: one line on failure, and this process's imports kept.

    Loading prepends the model's code dir to sys.path; MLflow's schema errors open with a dump of
    the input and end with their cause, which is all the user needs.
    """
    saved_path = list(sys.path)
    try:
        yield
    except (MlflowException, UserError) as exc:
        text = str(exc)
        cause = text.rsplit("Error: ", 1)[-1] if "Error: " in text else text
        raise UserError(f"{failure}: {cause.splitlines()[0]}{hint}") from None
    finally:
        sys.path[:] = saved_path


def predict_registered(model_uri: str, features: pd.DataFrame) -> np.ndarray:
    """Class names, (N,), from a registered model on raw rows, through MLflow's own loading path."""
    with _scoring(f"{model_uri} cannot score the current test set", "; remove its alias if the data changed shape"):
        return np.asarray(mlflow.pyfunc.load_model(model_uri).predict(features), dtype=object)


def score_model(model_uri: str, test: pd.DataFrame, label_column: str) -> float:
    """Accuracy of a registered model on raw test rows, through MLflow's own loading path."""
    predictions = predict_registered(model_uri, test.drop(columns=[label_column]))
    return float(np.mean(predictions == test[label_column].to_numpy(dtype=object)))


def _predict_candidate(model_dir: Path, ev: _Evidence) -> np.ndarray:
    """The candidate's class names on the test rows, (N,), checked against what eval.json says."""
    model, spec = models.load(model_dir)
    predictions = np.asarray(predict_frame(model, spec.schema, ev.features), dtype=object)
    said = _accuracy(ev.evals["student"], "student")
    scored = float(np.mean(predictions == ev.labels))
    if abs(said - scored) > 0.5 / len(ev.labels):  # more than one row apart: not the same model or rows
        raise UserError(f"{ev.eval_path} is stale: student {ACCURACY} {said:.4f}, but {model_dir} scores "
                        f"{scored:.4f} on the test split; re-run evaluate (dvc repro)")
    return predictions


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
    """Make the active run hold params (and params.yaml), dvc.lock and its per-stage hashes, the git
    commit, metrics, reports and the model: a version leads back to the exact inputs.

    Returns the logged model's URI, for registration.
    """
    _log_params(client, run_id, flat_params(params))
    tags = {**ev.fingerprints.tags(), **dvc_stage_hashes(root)}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    ts = int(time.time() * 1000)
    metrics = {**flat_metrics(ev.evals), **extra_metrics}
    client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
    for name in ("dvc.lock", "params.yaml"):
        if (root / name).exists():
            client.log_artifact(run_id, str(root / name))
    if (root / params.paths.validation).is_dir():
        client.log_artifacts(run_id, str(root / params.paths.validation), params.paths.validation)
    client.log_artifact(run_id, str(ev.eval_path), params.paths.metrics)
    return _log_model(root / params.paths.student, ev.test)


def _new_version(client: MlflowClient, name: str, model_uri: str, decision: Decision, fp: Fingerprints,
                 champion: ChampionScore | None) -> ModelVersion:
    """Register the version with its evidence as tags, then move the aliases."""
    tags = {"decision": decision.decision, **fp.tags(),
            "champion_version": str(champion.version) if champion is not None else "none",
            **{f"reason.{r}": reason for r, reason in zip(RULES, decision.reasons, strict=True)}}
    mv = mlflow.register_model(model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    if decision.decision == "promoted":
        history = [*_history(client, name), int(mv.version)]
        _move_champion(client, name, int(mv.version), champion.version if champion is not None else None,
                       "policy", current_user(), "every promotion rule passed", history)
    return client.get_model_version(name, mv.version)


def register_candidate(root: Path, params: Params) -> RegisterOutcome:
    """Register the evaluated student unless an identical candidate exists; apply the policy.

    Serialized by `registry_lock`, so two registrations never race for `champion`: the idempotence
    check and the champion are read under the lock. Uses the DAG run from MLFLOW_RUN_ID, else creates
    a run in `registry.experiment`.
    """
    root = Path(root).resolve()
    uri, name = tracking_uri(root), params.registry.model_name
    ev = _evidence(root, params)
    mlflow.set_tracking_uri(uri)  # the fluent calls (log, load, register) must use the same store
    client = _client(uri)
    with _tracking_errors(uri), registry_lock(uri, name):
        same = _identical_version(client, name, ev.fingerprints)
        if same is not None:
            return _recorded(client, name, same)
        champion_mv = _champion(client, name)
        champion_pred = (predict_registered(f"models:/{name}/{champion_mv.version}", ev.features)
                         if champion_mv is not None else None)
        candidate_pred = _predict_candidate(root / params.paths.student, ev)
        champion = (paired_score(int(champion_mv.version), candidate_pred, champion_pred, ev.labels)
                    if champion_mv is not None else None)
        decision = decide_promotion(ev.evals["student"], ev.evals["teacher"], ev.evals["baseline"],
                                    champion, params.policy)
        run_id = _target_run(client, params.registry.experiment, uri)
        extra = ({f"{CHAMPION}.{ACCURACY}": champion.accuracy,
                  f"{CHAMPION}.p_value": mcnemar_p_value(champion.wins, champion.losses)}
                 if champion is not None else {})
        # as the active run: a failure marks it FAILED, success FINISHED (then end_dag_run decides)
        with mlflow.start_run(run_id=run_id):
            model_uri = _record_run(client, run_id, root, params, ev, extra)
            mv = _new_version(client, name, model_uri, decision, ev.fingerprints, champion)
    return RegisterOutcome(decision.decision, decision.reasons, name, int(mv.version),
                           tuple(sorted(mv.aliases)), run_id, False)


# --- reading the registry; evidence added to a version after registration --------------------------
# (kd status, kd predict, the export and report stages)

@dataclass(frozen=True)
class VersionInfo:
    """One registered version as `kd status` shows it."""

    version: int
    aliases: tuple[str, ...]
    created: str  # UTC, to the minute
    tags: dict[str, str]
    metrics: dict[str, float]  # the eval.json its run holds, flattened: student.accuracy, teacher.macs, …

    @property
    def decision(self) -> str:
        return self.tags.get("decision", "?")

    @property
    def failed_rules(self) -> tuple[str, ...]:
        return tuple(k.removeprefix("reason.") for k, v in sorted(self.tags.items())
                     if k.startswith("reason.") and v.rstrip().endswith("fail"))


def _no_model(name: str, uri: str) -> UserError:
    return UserError(f"no registered model {name!r} in {uri} (hint: `kd run` trains and registers one; "
                     "MLFLOW_TRACKING_URI picks another store)")


def _logged_eval(client: MlflowClient, run_id: str | None, artifact: str) -> dict[str, float]:
    """The eval.json a run holds, flattened. Read from the artifact, not the run's metrics: the live
    training curves share names like student.accuracy, and a run's metrics show their last step."""
    if not run_id:
        return {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return flat_metrics(json.loads(Path(client.download_artifacts(run_id, artifact, tmp)).read_text()))
    except (MlflowException, OSError, ValueError):  # deleted run, or a run from before eval.json was logged
        return {}


def list_versions(root: Path, name: str, limit: int = 10, eval_artifact: str = "metrics/eval.json"
                  ) -> list[VersionInfo]:
    """The newest `limit` versions of `name`, newest first, and any older version an alias points at."""
    uri = tracking_uri(root)
    client = _client(uri)
    with _tracking_errors(uri):
        try:
            rm = client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise _no_model(name, uri) from None
        aliases: dict[int, list[str]] = {}
        for alias, v in rm.aliases.items():
            aliases.setdefault(int(v), []).append(alias)
        found = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda mv: -int(mv.version))
        keep = found[:limit] + [mv for mv in found[limit:] if int(mv.version) in aliases]
        out = []
        for mv in keep:
            metrics = _logged_eval(client, mv.run_id, eval_artifact)
            created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            out.append(VersionInfo(int(mv.version), tuple(sorted(aliases.get(int(mv.version), []))), created,
                                   dict(mv.tags), metrics))
    return out


def _version(client: MlflowClient, name: str, version: int | None, uri: str) -> ModelVersion:
    """Version `version` of `name`, or the champion when None; a missing one is a one-line error."""
    if version is None:
        try:
            client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise _no_model(name, uri) from None
        mv = _champion(client, name)
        if mv is None:
            raise UserError(f"{name} has no champion yet (hint: `kd status` lists versions; pass --version N)")
        return mv
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise UserError(f"{name} has no version {version} in {uri} (hint: `kd status` lists versions)") from None


def predict_table(root: Path, name: str, version: int | None, frame: pd.DataFrame
                  ) -> tuple[int, np.ndarray, pd.DataFrame]:
    """Score raw rows with version `version` of `name` (None: the champion), loaded as MLflow serves it.

    Returns the version used, class names (N,) and probabilities (N, K), one column per class name.
    """
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    with _tracking_errors(uri):
        v = int(_version(_client(uri), name, version, uri).version)
        with _scoring(f"{name} version {v} cannot score this table",
                      " (hint: it needs the feature columns the model was trained on, by name)"):
            model = mlflow.pyfunc.load_model(f"models:/{name}/{v}")
            classes = np.asarray(model.predict(frame, params={"output": "classes"}), dtype=object)
            probabilities = pd.DataFrame(model.predict(frame, params={"output": "probabilities"}))
    return v, classes, probabilities


def attach_to_version(root: Path, name: str, version: int, tags: dict[str, str], metrics: dict[str, float],
                      artifacts: list[tuple[str, Path]]) -> str | None:
    """Evidence made after registration (edge export, model card): `tags` on the model version;
    `metrics` and `artifacts` ((artifact folder, local file or directory) pairs) on the run it was
    registered from, so the version's page leads to them. Returns that run's id."""
    uri = tracking_uri(root)
    client = _client(uri)
    with _tracking_errors(uri):
        mv = _version(client, name, version, uri)
        for k, v in tags.items():
            client.set_model_version_tag(name, mv.version, _key(k), v)
        if not mv.run_id:
            return None
        ts = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), ts, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's batch limit
            client.log_batch(mv.run_id, metrics=batch[i:i + 1000])
        for dest, local in artifacts:
            if local.is_dir():
                client.log_artifacts(mv.run_id, str(local), dest)
            elif local.exists():
                client.log_artifact(mv.run_id, str(local), dest)
    return mv.run_id
