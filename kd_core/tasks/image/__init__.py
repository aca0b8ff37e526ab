"""Task `image`: everything about it lives in this package; `kd_core.tasks.get("image")` loads it on demand."""

from kd_core.tasks.base import Task
from kd_core.tasks.image.task import ImageTask

TASK: Task = ImageTask()

__all__ = ["TASK", "ImageTask"]
