"""Task `lm`: everything about it lives in this package; `kd_core.tasks.get("lm")` loads it on demand."""

from kd_core.tasks.base import Task
from kd_core.tasks.lm.task import LMTask

TASK: Task = LMTask()

__all__ = ["TASK", "LMTask"]
