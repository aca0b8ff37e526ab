"""Where the record lives: the MLflow tracking URI and client, the DAG run, live metrics, and
flattening params/metrics into MLflow's names. Connection failures become TrackingUnavailable
(a TransientError: exit 75, which the flow retries). Nothing runs at import time.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filelock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from kd_core.config import Params
from kd_core.errors import TransientError, UserError
from kd_core.provenance import git_commit

RUN_ID_ENV = "MLFLOW_RUN_ID"  # set by `kd run` for every stage process; absent under plain `dvc repro`

PROBE_TIMEOUT_S = 5.0
SCHEMA_LOCK_TIMEOUT_S = 900.0  # first use of a sqlite store by racing processes: wait for the creator


class TrackingUnavailable(TransientError):
    """The tracking server or store did not answer; worth retrying after a pause."""


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the project's own sqlite store (absolute, so any cwd agrees)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


@functools.lru_cache(maxsize=8)
def mlflow_client(uri: str) -> MlflowClient:
    """One client per URI: opening a sqlite store checks its schema, too slow to do every epoch.

    MLflow creates a new sqlite store's schema on first use, and two processes doing it at once fail
    (`duplicate column name`); so the first use of a sqlite store happens under a file lock.
    """
    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri)
    with filelock.FileLock(sqlite_lock_path(uri, "#schema-init"), timeout=SCHEMA_LOCK_TIMEOUT_S):
        client = MlflowClient(tracking_uri=uri)  # opens (creates, migrates) the tracking store
        client.search_registered_models(max_results=1)  # the registry store opens the same file
    return client


def sqlite_lock_path(uri: str, name: str) -> Path:
    """A lock file for `name` on a sqlite store, in the temp dir: beside the store git would see it."""
    store = f"{Path(uri.removeprefix('sqlite:///')).resolve()}:{name}"
    return Path(tempfile.gettempdir()) / f"kd-register-{hashlib.sha256(store.encode()).hexdigest()[:16]}.lock"


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts next to a sqlite store (MLflow's default is ./mlruns of whatever the cwd is)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides where its artifacts go
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns" / key(experiment)).as_uri()


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException as exc:  # another process created it in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            assert exp is not None  # creating it failed because it exists
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


def unavailable(exc: MlflowException, uri: str) -> TrackingUnavailable | None:
    """TrackingUnavailable for a store that did not answer (refused, timed out, 5xx after MLflow's own
    retries, a busy sqlite file), one line naming it; None for anything else."""
    line = (str(exc).splitlines() or [""])[0]
    if line.startswith("API request to") or "database is locked" in line:
        return TrackingUnavailable(f"MLflow at {uri} is unavailable: {line[:300]}")
    return None


@contextmanager
def tracking_errors(uri: str) -> Iterator[None]:
    """Turn MLflow's connection failures into TrackingUnavailable, one line naming the store."""
    try:
        yield
    except MlflowException as exc:
        transient = unavailable(exc, uri)
        if transient is None:
            raise
        raise transient from None


def key(name: str) -> str:
    """MLflow keys allow word characters, '-', '.', ' ' and '/'; DVC's 'stage@item' needs this."""
    return re.sub(r"[^\w\-. /]", "_", name)


def _flatten(obj: Any, prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """Nested dicts (and, with `lists`, lists by index) to dotted keys: {'train.lr': 0.002}."""
    items: Iterable[tuple[Any, Any]]
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
    values = {key(k): v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}
    return {k: v if len(v) <= MAX_PARAM_VAL_LENGTH else v[:MAX_PARAM_VAL_LENGTH - 1] + "…"
            for k, v in values.items()}


def flat_metrics(obj: dict) -> dict[str, float]:
    """Every finite number in eval.json under its path: {'student.accuracy': 0.93, …}."""
    return {key(k): float(v) for k, v in _flatten(obj, lists=True).items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def log_params(client: MlflowClient, run_id: str, flat: dict[str, str]) -> None:
    """Log the params the run lacks (MLflow params are write-once), in MLflow's batch size."""
    have = client.get_run(run_id).data.params
    todo = [Param(k, v) for k, v in flat.items() if k not in have]
    for i in range(0, len(todo), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=todo[i:i + MAX_PARAMS_TAGS_PER_BATCH])


def start_dag_run(root: Path, params: Params) -> str:
    """Create the one run that records a DAG run; `kd run` hands its id to stages as MLFLOW_RUN_ID."""
    uri = tracking_uri(root)
    client = mlflow_client(uri)
    with tracking_errors(uri):
        run = client.create_run(experiment_id(client, params.registry.experiment, uri),
                                tags={"params_hash": params.digest(), "git_commit": git_commit(root)})
        log_params(client, run.info.run_id, flat_params(params))
    return run.info.run_id


def end_dag_run(root: Path, run_id: str, status: str) -> None:
    """Close the DAG run with FINISHED, FAILED or KILLED (the `register` stage may have set one)."""
    uri = tracking_uri(root)
    with tracking_errors(uri):
        mlflow_client(uri).set_terminated(run_id, status=status)


def log_epoch_metrics(root: Path, metrics: dict[str, float], step: int) -> None:
    """Send one epoch's metrics to the DAG run; a no-op without MLFLOW_RUN_ID (plain `dvc repro`).

    Asynchronous: training never waits on the tracking store, and MLflow flushes at exit.
    """
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id or not metrics:
        return
    ts = int(time.time() * 1000)
    batch = [Metric(key(k), float(v), ts, step) for k, v in metrics.items()]
    uri = tracking_uri(root)
    _LIVE.add(uri)
    mlflow_client(uri).log_batch(run_id, metrics=batch, synchronous=False)


_LIVE: set[str] = set()  # stores this process sent live metrics to, asynchronously


def flush_live_metrics() -> None:
    """Wait until the queued live metrics are written. MLflow drains its queue at interpreter exit, but
    by then concurrent.futures refuses new work, so the last epochs of a stage that ends right after
    them were now and then lost; a stage calls this before it exits. An outage only costs the curves."""
    for uri in list(_LIVE):
        with contextlib.suppress(Exception):  # live curves are best effort; the stage's outputs are what count
            mlflow_client(uri)._tracking_client.store.flush_async_logging()  # the client's own store
        _LIVE.discard(uri)


def log_child_run(root: Path, name: str, summary: dict[str, Any], history: list[dict[str, float]]) -> str:
    """A finished child run of the DAG run (MLflow's `mlflow.parentRunId` tag nests it in the UI): the
    settings of `summary` as params, its scores as `best.<name>` metrics, one step per row of `history`."""
    parent = os.environ[RUN_ID_ENV]
    uri = tracking_uri(root)
    client = mlflow_client(uri)
    with tracking_errors(uri):
        exp = client.get_run(parent).info.experiment_id
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent, "kd.role": "search"})
        rid = run.info.run_id
        log_params(client, rid, {k: str(v) for k, v in summary.items() if not isinstance(v, float) or k in (
            "alpha", "temperature")})
        ts = int(time.time() * 1000)
        metrics = [Metric(key(k), float(v), ts, int(row["epoch"])) for row in history for k, v in row.items()
                   if k != "epoch" and math.isfinite(v)]
        metrics += [Metric(key(f"best.{k}"), float(v), ts, 0) for k, v in summary.items()
                    if isinstance(v, float) and k not in ("alpha", "temperature") and math.isfinite(v)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        client.set_terminated(rid, status="FINISHED")
    return rid
