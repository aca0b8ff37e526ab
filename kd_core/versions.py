"""Reading the registry back (kd status, kd predict) and evidence added to a version after it was
registered (the export and report stages).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from kd_core import tracking
from kd_core.errors import UserError

CHAMPION = "champion"  # the alias the policy (or `kd promote`) moves


def champion_version(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


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
            return tracking.flat_metrics(json.loads(Path(client.download_artifacts(run_id, artifact, tmp)).read_text()))
    except (MlflowException, OSError, ValueError):  # deleted run, or a run from before eval.json was logged
        return {}


def list_versions(root: Path, name: str, limit: int = 10, eval_artifact: str = "metrics/eval.json"
                  ) -> list[VersionInfo]:
    """The newest `limit` versions of `name`, newest first, and any older version an alias points at."""
    uri = tracking.tracking_uri(root)
    client = tracking.mlflow_client(uri)
    with tracking.tracking_errors(uri):
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
        mv = champion_version(client, name)
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
    from kd_core import serving  # torch and the model code: only to score, not to list versions

    uri = tracking.tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    with tracking.tracking_errors(uri):
        v = int(_version(tracking.mlflow_client(uri), name, version, uri).version)
        with serving.scoring(f"{name} version {v} cannot score this table",
                             " (hint: it needs the feature columns the model was trained on, by name)"):
            model = mlflow.pyfunc.load_model(f"models:/{name}/{v}")
            classes = np.asarray(model.predict(frame, params={"output": "classes"}), dtype=object)
            probabilities = pd.DataFrame(model.predict(frame, params={"output": "probabilities"}))
    return v, classes, probabilities


def complete_table(root: Path, name: str, version: int | None, frame: pd.DataFrame) -> tuple[int, np.ndarray]:
    """`lm`: greedy completions (N,) of the prompts in `frame` by version `version` (None: the champion),
    loaded as MLflow serves it; returns the version used and the completions."""
    from kd_core import serving

    uri = tracking.tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    with tracking.tracking_errors(uri):
        v = int(_version(tracking.mlflow_client(uri), name, version, uri).version)
        with serving.scoring(f"{name} version {v} cannot complete these prompts",
                             " (hint: it needs the prompt column the model was trained on, by name)"):
            completions = mlflow.pyfunc.load_model(f"models:/{name}/{v}").predict(frame)
    return v, np.asarray(completions, dtype=object)


def attach_to_version(root: Path, name: str, version: int, tags: dict[str, str], metrics: dict[str, float],
                      artifacts: list[tuple[str, Path]]) -> str | None:
    """Evidence made after registration (edge export, model card): `tags` on the model version;
    `metrics` and `artifacts` ((artifact folder, local file or directory) pairs) on the run it was
    registered from, so the version's page leads to them. Returns that run's id."""
    uri = tracking.tracking_uri(root)
    client = tracking.mlflow_client(uri)
    with tracking.tracking_errors(uri):
        mv = _version(client, name, version, uri)
        for k, v in tags.items():
            client.set_model_version_tag(name, mv.version, tracking.key(k), v)
        if not mv.run_id:
            return None
        ts = int(time.time() * 1000)
        batch = [Metric(tracking.key(k), float(v), ts, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's batch limit
            client.log_batch(mv.run_id, metrics=batch[i:i + 1000])
        for dest, local in artifacts:
            if local.is_dir():
                client.log_artifacts(mv.run_id, str(local), dest)
            elif local.exists():
                client.log_artifact(mv.run_id, str(local), dest)
    return mv.run_id
