"""Task `tabular`: everything about it lives in this package; `kd_core.tasks.get("tabular")` loads it on demand."""

from kd_core.tasks.base import Task
from kd_core.tasks.tabular.task import TabularTask

TASK: Task = TabularTask()

__all__ = ["TASK", "TabularTask"]
