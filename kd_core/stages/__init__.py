"""One module per DAG stage, each with one public ``run(params, workdir) -> Result``.

`kd stage NAME` (what dvc.yaml runs) imports ``kd_core.stages.NAME`` and calls ``run``; every
Result has ``summary()``, the one line the CLI prints.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGES = ("prepare", "validate", "teacher", "cache_logits", "train_student", "train_baseline",
          "evaluate", "register", "export", "report")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `final` only if the block succeeds.

    A failed stage therefore never leaves a half-written output where a later stage would trust it.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file via a temporary name and rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
