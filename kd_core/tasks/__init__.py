"""The task seam: what a row is (table row, document, token position) and everything that follows from it.

`params.task` names a `Task`; stages, the cache, the training loop, the registry and the model card
ask it instead of branching on the modality. Today's task is `tabular`; `text` and `lm` plug in here.
"""

from __future__ import annotations

from kd_core.config import Params
from kd_core.tasks.base import Task
from kd_core.tasks.tabular import TabularTask

TASKS: dict[str, Task] = {"tabular": TabularTask()}


def for_params(params: Params) -> Task:
    """The task object `params.task` selects (validated by config, so the lookup cannot miss)."""
    return TASKS[params.task]


__all__ = ["TASKS", "Task", "for_params"]
