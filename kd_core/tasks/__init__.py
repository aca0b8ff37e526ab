"""The task seam: what a row is (table row, document, token position) and everything that follows from it.

`params.task` names a `Task`: one package `kd_core/tasks/<name>/` holding everything about it, whose
`TASK` implements the protocol of `kd_core.tasks.base`. Stages, the cache, the training loop, the
registry and the model card ask it instead of branching on the modality. Packages are imported by name
on first use, so a stage imports only the task its params name (and its DVC code deps list only that
package). A new task is a new package here; nothing generic names it.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from pathlib import Path

from torch import nn

from kd_core.config import Params
from kd_core.errors import UserError
from kd_core.models import DEFAULT_TASK, META_FILE, ModelSpec
from kd_core.tasks.base import Task

DEFAULT = DEFAULT_TASK  # the task of a params.yaml without `task:` and of the first releases' model.json


def names() -> tuple[str, ...]:
    """Every task this kd knows: the packages beside this module, sorted (`_name`: shared code, not a task)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and not m.name.startswith("_")))


@functools.cache
def get(name: str) -> Task:
    """The task called `name`, its package imported on first use; an unknown name is a one-line UserError."""
    if name not in names():
        raise UserError(f"task {name!r} is not one this kd knows ({', '.join(names())})")
    return importlib.import_module(f"{__name__}.{name}").TASK


def for_params(params: Params) -> Task:
    """The task object `params.task` selects."""
    return get(params.task)


def load_model(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Any kd model directory, loaded by the task its model.json names."""
    meta = path / META_FILE
    if not meta.is_file():
        raise UserError(f"{path} is not a kd model directory (no {META_FILE})")
    try:
        name = json.loads(meta.read_text()).get("task", DEFAULT)
    except (ValueError, AttributeError):
        raise UserError(f"{meta}: not a kd model description (invalid JSON)") from None
    if name not in names():
        raise UserError(f"{meta}: task {name!r} is not one this kd knows ({', '.join(names())})")
    return get(name).load(path)


__all__ = ["Task", "for_params", "get", "load_model", "names"]
