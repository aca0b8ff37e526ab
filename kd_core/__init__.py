"""kd_core: the pure library behind the knowledge-distillation pipeline."""

__version__ = "0.1.0"
