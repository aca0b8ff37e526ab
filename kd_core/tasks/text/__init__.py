"""Task `text`: everything about it lives in this package; `kd_core.tasks.get("text")` loads it on demand."""

from kd_core.tasks.base import Task
from kd_core.tasks.text.task import TextTask

TASK: Task = TextTask()

__all__ = ["TASK", "TextTask"]
