"""Registration, promotion and rollback in the MLflow model registry.

`register_candidate` gathers the evidence (eval.json, and the champion and candidate scored on the
same test rows), asks the pure policy (kd_core.policy) and writes the outcome, the model version
last, so a failure never leaves a half-registered candidate. Every move of the `champion` alias
(policy, `kd promote`, `kd rollback`) happens under the registry lock (kd_core.lock), re-reads the
champion there, and leaves an audit entry. Reading versions back is kd_core.versions.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from kd_core import data, search, serving, tasks, tracking
from kd_core.config import Params
from kd_core.errors import UserError
from kd_core.lock import registry_lock
from kd_core.policy import (
    ACCURACY,
    PERPLEXITY,
    RULES,
    ChampionScore,
    Decision,
    accuracy,
    decide_promotion,
    mcnemar_p_value,
    paired_score,
)
from kd_core.provenance import Fingerprints, current_user, dvc_stage_hashes, fingerprints
from kd_core.versions import CHAMPION, champion_version

CHALLENGER = "challenger"

HISTORY_TAG, AUDIT_PREFIX = "champion_history", "audit."  # registered-model tags kd keeps

MAX_HISTORY, MAX_REASON = 200, 500  # keep tags well inside the store's column sizes


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
    uri, name = tracking.tracking_uri(Path(root)), params.registry.model_name
    reason, client = _reason(reason), tracking.mlflow_client(uri)
    tracking.check_tracking(Path(root))
    with tracking.tracking_errors(uri), registry_lock(uri, name):
        try:
            client.get_model_version(name, str(version))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise UserError(f"{name} has no version {version} in {uri}") from None
        champion = champion_version(client, name)  # re-read under the lock
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
    uri, name = tracking.tracking_uri(Path(root)), params.registry.model_name
    reason, client = _reason(reason), tracking.mlflow_client(uri)
    tracking.check_tracking(Path(root))
    with tracking.tracking_errors(uri), registry_lock(uri, name):
        champion = champion_version(client, name)  # re-read under the lock
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
    task: str
    fingerprints: Fingerprints
    schema: data.Schema

    @functools.cached_property
    def features(self) -> pd.DataFrame:
        """The raw test inputs as a client sends them (text: the documents, not the prepared ids; image:
        PNG-encoded, so built once for the candidate and the champion)."""
        return tasks.get(self.task).client_inputs(self.test, self.schema)

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
    return _Evidence(evals, path, splits.test, splits.schema.label_column, params.task,
                     fingerprints(root, params), splits.schema)


def _identical_version(client: MlflowClient, name: str, fp: Fingerprints) -> ModelVersion | None:
    """The newest version registered from exactly these inputs, if any."""
    query = " AND ".join([f"name = '{name}'", *(f"tags.{k} = '{v}'" for k, v in fp.identity().items())])
    found = client.search_model_versions(query)
    return max(found, key=lambda mv: int(mv.version)) if found else None


def _recorded(client: MlflowClient, name: str, mv: ModelVersion) -> RegisterOutcome:
    mv = client.get_model_version(name, mv.version)  # search results carry no aliases
    reasons = [mv.tags[f"reason.{r}"] for r in RULES if f"reason.{r}" in mv.tags]
    decision = cast(Literal["promoted", "rejected"], mv.tags["decision"])  # as decide_promotion wrote it
    return RegisterOutcome(decision, (f"unchanged: identical to version {mv.version}", *reasons),
                           name, int(mv.version), tuple(sorted(mv.aliases)), None, True)


def _predict_candidate(model_dir: Path, ev: _Evidence) -> np.ndarray:
    """The candidate's class names on the test rows, (N,), checked against what eval.json says."""
    model, spec = tasks.load_model(model_dir)
    predictions = np.asarray(serving.predict_frame(model, spec, ev.features), dtype=object)
    said = accuracy(ev.evals["student"], "student")
    scored = float(np.mean(predictions == ev.labels))
    if abs(said - scored) > 0.5 / len(ev.labels):  # more than one row apart: not the same model or rows
        raise UserError(f"{ev.eval_path} is stale: student {ACCURACY} {said:.4f}, but {model_dir} scores "
                        f"{scored:.4f} on the test split; re-run evaluate (dvc repro)")
    return predictions


@dataclass(frozen=True)
class ChampionInputs:
    """What a task needs to score the candidate beside the champion (kd_core.tasks.base.Task.champion_score)."""

    root: Path
    params: Params
    evidence: _Evidence
    champion: int | None  # the champion's version, None when there is none

    @property
    def candidate_dir(self) -> Path:
        return self.root / self.params.paths.student

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.params.registry.model_name}/{self.champion}"

    def champion_dir(self) -> Path:
        """The champion's model directory, downloaded from the registry under paths.work."""
        return serving.download_model_dir(self.champion_uri, self.root / self.params.paths.work / "champion",
                                          self.root)

    def stale(self, metric: str, said: object, scored: float) -> UserError:
        """eval.json says another score than the candidate gets: it belongs to other rows or another model."""
        return UserError(f"{self.evidence.eval_path} is stale: student {metric} {said}, but "
                         f"{self.params.paths.student} scores {scored:.4f} on the test split; re-run evaluate "
                         "(dvc repro)")


def served_champion(inputs: ChampionInputs) -> ChampionScore | None:
    """A classifier's champion score: the candidate checked against eval.json, and the champion re-scored
    through its own served model on the same test rows (paired, per row)."""
    ev = inputs.evidence
    if inputs.champion is None:
        _predict_candidate(inputs.candidate_dir, ev)
        return None
    champion_pred = serving.predict_registered(inputs.champion_uri, ev.features)
    candidate_pred = _predict_candidate(inputs.candidate_dir, ev)
    return paired_score(inputs.champion, candidate_pred, champion_pred, ev.labels)


def _target_run(client: MlflowClient, experiment: str, uri: str) -> str:
    """The DAG run named by MLFLOW_RUN_ID, else a new run in `experiment` (plain `dvc repro`)."""
    run_id = os.environ.get(tracking.RUN_ID_ENV)
    if not run_id:
        return client.create_run(tracking.experiment_id(client, experiment, uri)).info.run_id
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(f"{tracking.RUN_ID_ENV}={run_id} is not a run in {uri}") from None
    return run_id


def _record_run(client: MlflowClient, run_id: str, root: Path, params: Params, ev: _Evidence,
                extra_metrics: dict[str, float]) -> str:
    """Make the active run hold params (and params.yaml), dvc.lock and its per-stage hashes, the git
    commit, metrics, reports and the model: a version leads back to the exact inputs.

    Returns the logged model's URI, for registration.
    """
    tracking.log_params(client, run_id, tracking.flat_params(params))
    tags = {**ev.fingerprints.tags(), **{tracking.key(k): v for k, v in dvc_stage_hashes(root).items()}}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    ts = int(time.time() * 1000)
    metrics = {**tracking.flat_metrics(ev.evals), **extra_metrics}
    client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
    for name in ("dvc.lock", "params.yaml"):
        if (root / name).exists():
            client.log_artifact(run_id, str(root / name))
    if (root / params.paths.validation).is_dir():
        client.log_artifacts(run_id, str(root / params.paths.validation), params.paths.validation)
    client.log_artifact(run_id, str(ev.eval_path), params.paths.metrics)
    return serving.log_model(root / params.paths.student, ev.test)


def setting_tags(params: Params, student_dir: Path) -> dict[str, str]:
    """The distillation setting the student was trained with, and whether distill.search chose it."""
    record = search.read(student_dir)
    d = search.chosen_setting(params.distill, record)
    how = (f"{record.get('decision', 'chosen')}; {len(record['trials'])} settings on the same budget, scored on "
           f"{record.get('scored_by', 'the validation rows')}" if record else "configured (distill.search off)")
    return {"distill.setting": search.label(d.alpha, d.temperature, d.loss), "distill.search": how}


def _new_version(client: MlflowClient, name: str, model_uri: str, decision: Decision, fp: Fingerprints,
                 champion: ChampionScore | None, setting: dict[str, str]) -> ModelVersion:
    """Register the version with its evidence as tags, then move the aliases."""
    tags = {"decision": decision.decision, **fp.tags(), **setting,
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
    uri, name = tracking.tracking_uri(root), params.registry.model_name
    ev = _evidence(root, params)
    mlflow.set_tracking_uri(uri)  # the fluent calls (log, load, register) must use the same store
    client = tracking.mlflow_client(uri)
    with tracking.tracking_errors(uri), registry_lock(uri, name):
        same = _identical_version(client, name, ev.fingerprints)
        if same is not None:
            return _recorded(client, name, same)
        champion_mv = champion_version(client, name)
        champion = tasks.for_params(params).champion_score(
            ChampionInputs(root, params, ev, int(champion_mv.version) if champion_mv is not None else None))
        decision = decide_promotion(ev.evals["student"], ev.evals["teacher"], ev.evals["baseline"],
                                    champion, params.policy)
        run_id = _target_run(client, params.registry.experiment, uri)
        extra = ({f"{CHAMPION}.{ACCURACY}": champion.accuracy,
                  f"{CHAMPION}.p_value": mcnemar_p_value(champion.wins, champion.losses)}
                 | ({f"{CHAMPION}.{PERPLEXITY}": champion.perplexity} if champion.perplexity is not None else {})
                 if champion is not None and champion.incomparable is None else {})
        # as the active run: a failure marks it FAILED, success FINISHED (then end_dag_run decides)
        with mlflow.start_run(run_id=run_id):
            model_uri = _record_run(client, run_id, root, params, ev, extra)
            mv = _new_version(client, name, model_uri, decision, ev.fingerprints, champion,
                              setting_tags(params, root / params.paths.student))
    return RegisterOutcome(decision.decision, decision.reasons, name, int(mv.version),
                           tuple(sorted(mv.aliases)), run_id, False)
