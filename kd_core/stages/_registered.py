"""Which registered version a run's export and report belong to: what `register` wrote.

Its own small module, so the export and report stages depend on it and not on the training code.
"""

from __future__ import annotations

import json
from pathlib import Path

from kd_core.config import Params

REGISTER_FILE = "register.json"  # under paths.metrics: what the register stage decided


def registered_version(params: Params, workdir: Path) -> int | None:
    """The version `register` wrote for this student, if it ran (export and report attach to it)."""
    path = workdir / params.paths.metrics / REGISTER_FILE
    if not path.exists():
        return None
    reg = json.loads(path.read_text())
    return int(reg["version"]) if reg.get("model_name") == params.registry.model_name else None
