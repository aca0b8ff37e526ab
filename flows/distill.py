"""The distillation DAG as a Prefect flow: one task per DVC stage, in dvc.yaml's order.

Each task runs `dvc repro --single-item STAGE`, so DVC decides what is stale and keeps dvc.lock
true, and `kd run` always agrees with a manual `dvc repro`. Prefect adds retries, logs and
schedules (flows/schedule.py, prefect.yaml); it keeps no cache of its own. The flow opens one
MLflow run per DAG run and hands it to the stages through MLFLOW_RUN_ID.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from prefect import State, flow, get_run_logger, task

from flows.alerts import alert_on_failure
from kd_core import tracking
from kd_core.config import load_params
from kd_core.errors import TransientError
from kd_core.stages import STAGES

# The one retry layer: a stage that exits 75 (TransientError: MLflow, a Dask cluster or a model store
# did not answer) is run again after these pauses, long enough for a server to restart. Any other
# failure is final at once: a bad input fails the same way every time.
RETRY_DELAYS_S = [2, 5, 10]


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message is that stage's one-line error."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool


def _error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    ours = [ln.removeprefix("kd: error: ") for ln in lines if ln.startswith("kd: error:")]
    dvc_errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (ours or dvc_errors or lines or ["failed without a message"])[0]


def _env(run_id: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `kd` of this env
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if run_id:
        env["MLFLOW_RUN_ID"] = run_id
    return env


def _restore_last_good(name: str, root: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """DVC deletes a stage's outputs before running it; put the last good ones (dvc.lock) back.

    The failed stage never updated dvc.lock, so `dvc checkout` restores exactly the outputs of the
    last successful run from DVC's cache: a bad input costs no earlier artifact.
    """
    proc = subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force", name], cwd=root,
                          env=_env(None), capture_output=True, text=True)
    logger.log(logging.DEBUG if proc.returncode == 0 else logging.WARNING,
               f"restored the last good outputs of {name}: {(proc.stdout + proc.stderr).strip()[:500]}")


def run_stage(name: str, root: str, run_id: str | None) -> StageOutcome:
    """Run one DVC stage; raise StageFailed with the stage's own error line when it fails."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", name],
                          cwd=root, env=_env(run_id), capture_output=True, text=True)
    logger = get_run_logger()
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():  # the stage's own summary and notes on the console, DVC's chatter in debug
            ours = line.startswith((f"{name}: ", "kd: "))
            logger.log(logging.INFO if ours else logging.DEBUG, line)
    if proc.returncode != 0:
        _restore_last_good(name, root, logger)
        transient = f"exited with {TransientError.exit_code}" in proc.stderr  # dvc reports the cmd's code
        raise StageFailed(f"stage {name} failed: {_error_line(proc.stderr)}", transient)
    return StageOutcome(name, ran="didn't change, skipping" not in proc.stdout)


def _transient(_task: object, _run: object, state: State) -> bool:
    """Retry only outages: a bad input fails the same way every time."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, StageFailed) and exc.transient


stage_tasks = {name: task(run_stage, name=name, retries=len(RETRY_DELAYS_S),
                          retry_delay_seconds=RETRY_DELAYS_S, retry_condition_fn=_transient)
               for name in STAGES}


def _open_dag_run(path: Path) -> str | None:
    """The DAG run's MLflow run; none while MLflow is down, as under plain `dvc repro`.

    The compute stages need no tracking server; `register` creates the run itself, and retries
    while the server is away.
    """
    try:
        tracking.check_tracking(path)  # one short probe: MLflow's client would retry for minutes
        return tracking.start_dag_run(path, load_params(path))
    except TransientError as exc:
        get_run_logger().warning(f"kd: note: {exc}; the stages run without live metrics")
        return None


@flow(name="kd-distill", log_prints=True, on_failure=[alert_on_failure], on_crashed=[alert_on_failure])
def distill(root: str = ".") -> list[StageOutcome]:
    """prepare → validate → teacher → cache_logits → train_student, train_baseline → evaluate → register.

    One MLflow run records the DAG run; its status follows the flow's. A failed deployed run alerts.
    """
    path = Path(root).resolve()
    run_id = _open_dag_run(path)
    try:
        outcomes = [stage_tasks[name](name, str(path), run_id) for name in STAGES]
    except BaseException:
        if run_id:
            tracking.end_dag_run(path, run_id, "FAILED")
        raise
    if run_id:
        tracking.end_dag_run(path, run_id, "FINISHED")
    return outcomes


class _NoStageTracebacks(logging.Filter):
    """A failed stage already printed its one-line error; keep Prefect's console to that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StageFailed):
            record.exc_info, record.exc_text = None, None
        return True


def run_dag(root: Path) -> list[StageOutcome]:
    """`kd run`: the flow in this process, its console kept to one line per failed stage."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NoStageTracebacks())
    return distill(str(root))
