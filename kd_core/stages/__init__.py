"""One module per DAG stage, each with one public ``run(params, workdir) -> Result``.

`kd stage NAME` (what dvc.yaml runs) imports ``kd_core.stages.NAME`` and calls ``run``; every
Result has ``summary()``, the one line the CLI prints.
"""

from __future__ import annotations

STAGES = ("prepare", "validate", "teacher", "cache_logits", "train_student", "train_baseline",
          "evaluate", "register", "export", "report")
