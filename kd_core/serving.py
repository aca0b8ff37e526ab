"""The served model: a kd model directory as an MLflow pyfunc that answers raw inputs (columns by
name, class names inside), logged as models-from-code so loading it never unpickles anything; and
downloading or scoring registered models through MLflow's own loading path.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.pyfunc import PythonModel, PythonModelContext

from kd_core import models, tasks, tracking
from kd_core.errors import UserError

if TYPE_CHECKING:
    from torch import nn

MODEL_ARTIFACT = "kd_model"  # name of the kd model directory inside the pyfunc model's artifacts

MODEL_NAME_IN_RUN = "model"

PACKAGE = "kd_core"  # logged with every model (code_paths); the model code imports from it


SERVING_PACKAGES = ("torch", "safetensors", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml")

# models-from-code: MLflow runs this file to get the model, so loading one never unpickles anything
_MODEL_CODE = '''"""MLflow model code for a kd student (see kd_core/serving.py)."""
import mlflow

from kd_core.serving import KDPyfuncModel

mlflow.models.set_model(KDPyfuncModel())
'''


def predict_frame(model: nn.Module, spec: models.ModelSpec, frame: pd.DataFrame,
                  output: str | None = None, **params: Any) -> np.ndarray | pd.DataFrame:
    """Raw inputs -> what the model's task answers: class names or probabilities (tables: columns by
    name, any order, extras ignored; text: documents), or completions (`lm`: prompts)."""
    task = tasks.get(spec.task)
    return task.answer(model, spec, frame, {"output": output or task.outputs[0], **params})


class KDPyfuncModel(PythonModel):
    """A kd model directory served on raw rows; answers class names (or probabilities on request)."""

    def load_context(self, context: PythonModelContext) -> None:
        self._model, self._spec = tasks.load_model(Path(context.artifacts[MODEL_ARTIFACT]))

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray | pd.DataFrame:
        return predict_frame(self._model, self._spec, model_input, **(params or {}))


def _requirement(package: str) -> str:
    """`package==version` as installed (local tags like +cpu dropped), so serving builds the same env."""
    return f"{package}=={version(package).split('+')[0]}"


def log_model(model_dir: Path, test: pd.DataFrame) -> str:
    """Log `model_dir` as a pyfunc into the active run; returns the model URI to register."""
    model, spec = tasks.load_model(model_dir)
    task = tasks.get(spec.task)
    example = task.input_example(model, test, spec.schema)
    answers = predict_frame(model, spec, example).tolist()
    signature = infer_signature(example, answers, params={"output": task.outputs[0], **task.serving_params})
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "kd_pyfunc_model.py"
        code.write_text(_MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN, python_model=str(code), artifacts={MODEL_ARTIFACT: str(model_dir)},
            code_paths=[str(Path(__file__).resolve().parent)], signature=signature,
            input_example=example,
            pip_requirements=[_requirement(p) for p in (*SERVING_PACKAGES, *tasks.get(spec.task).requirements)])
    return info.model_uri


def download_model_dir(uri: str, dest: Path, root: Path | None = None) -> Path:
    """Fetch a kd model directory from an MLflow URI: a model kd registered, or a logged model dir.

    `root` is the project root (for the default tracking store); the cwd when not given. `dest` is
    scratch space, emptied first so no earlier download can be mistaken for this one.
    """
    root = root or Path.cwd()
    tracking.check_tracking(root)  # a server that is down: TrackingUnavailable (exit 75, retried), not minutes
    store = tracking.tracking_uri(root)
    mlflow.set_tracking_uri(store)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    try:
        with tracking.tracking_errors(store):
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


def _kd_modules() -> dict[str, ModuleType]:
    return {n: m for n, m in sys.modules.items() if n == PACKAGE or n.startswith(f"{PACKAGE}.")}


def _kd_error(exc: BaseException) -> bool:
    """A kd error (UserError and its kin) from this kd_core or from the copy a model carries."""
    return any(c.__module__ == f"{PACKAGE}.errors" for c in type(exc).__mro__)


@contextmanager
def scoring(failure: str, hint: str) -> Iterator[None]:
    """Load and score a registered model with its own code: one line on failure, this process kept.

    A kd model carries the kd_core it was logged with (code_paths) and its model code imports from
    it, as `mlflow models serve` runs it. Here kd_core is already imported and would shadow that
    copy, so a version logged by another kd release (its model code may name a module this one no
    longer has: `kd_core.registry` before the split) could not load. So this process's kd_core is
    set aside while the model loads and scores, and put back after, with sys.path (which loading
    prepends the model's code dir to). A store that does not answer is TrackingUnavailable (exit 75);
    MLflow's schema errors open with a dump of the input and end with their cause, which is all the
    user needs.
    """
    saved_path, ours = list(sys.path), _kd_modules()
    for name in ours:
        del sys.modules[name]
    try:
        yield
    except Exception as exc:
        if not isinstance(exc, MlflowException) and not _kd_error(exc):
            raise
        transient = tracking.unavailable(exc, mlflow.get_tracking_uri()) if isinstance(exc, MlflowException) else None
        if transient is not None:  # the store, not the model: exit 75, retried
            raise transient from None
        text = str(exc)
        cause = text.rsplit("Error: ", 1)[-1] if "Error: " in text else text
        raise UserError(f"{failure}: {cause.splitlines()[0]}{hint}") from None
    finally:
        for name in _kd_modules():
            del sys.modules[name]
        sys.modules.update(ours)
        sys.path[:] = saved_path


def predict_registered(model_uri: str, features: pd.DataFrame) -> np.ndarray:
    """Class names, (N,), from a registered model on raw rows, through MLflow's own loading path."""
    with scoring(f"{model_uri} cannot score the current test set", "; remove its alias if the data changed shape"):
        return np.asarray(mlflow.pyfunc.load_model(model_uri).predict(features), dtype=object)

