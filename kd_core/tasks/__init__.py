"""The task seam: what a row is (table row, document, token position) and everything that follows from it.

`params.task` names a `Task`; stages, the cache, the training loop, the registry and the model card
ask it instead of branching on the modality. Tasks: `tabular`, `text`, `lm`.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from kd_core.config import Params
from kd_core.errors import UserError
from kd_core.models import META_FILE, ModelSpec
from kd_core.tasks.base import Task
from kd_core.tasks.lm import LMTask
from kd_core.tasks.tabular import TabularTask
from kd_core.tasks.text import TextTask

TASKS: dict[str, Task] = {"tabular": TabularTask(), "text": TextTask(), "lm": LMTask()}


def for_params(params: Params) -> Task:
    """The task object `params.task` selects (validated by config, so the lookup cannot miss)."""
    return TASKS[params.task]


def load_model(path: Path) -> tuple[nn.Module, ModelSpec]:
    """Any kd model directory, loaded by the task its model.json names (older ones: tabular)."""
    meta = path / META_FILE
    if not meta.is_file():
        raise UserError(f"{path} is not a kd model directory (no {META_FILE})")
    try:
        name = json.loads(meta.read_text()).get("task", "tabular")
    except (ValueError, AttributeError):
        raise UserError(f"{meta}: not a kd model description (invalid JSON)") from None
    if name not in TASKS:
        raise UserError(f"{meta}: task {name!r} is not one this kd knows ({', '.join(TASKS)})")
    return TASKS[name].load(path)


__all__ = ["TASKS", "Task", "for_params", "load_model"]
