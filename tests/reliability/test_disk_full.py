"""Disk full while writing the cache (RLIMIT_FSIZE; tests run as root, so chmod would not stop writes)."""

import resource
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, kd, run_cmd
from tests.reliability.conftest import Damage, lost_bytes, snapshot

pytestmark = pytest.mark.slow


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # bytes: a 1024-row shard is 41,088


@pytest.mark.fault("disk full while caching")
def test_file_size_limit_gives_clear_error_and_no_trusted_partial_shard(project: Path, tally: Damage) -> None:
    for name in ("prepare", "teacher"):
        assert kd(project, "stage", name).returncode == 0
    earlier = snapshot(project, ["data/prepared", "artifacts/teacher"])
    res = subprocess.run([str(BIN / "kd"), "stage", "cache_logits"], cwd=project, capture_output=True,
                         text=True, preexec_fn=_limit_file_size)
    tally.lost(lost_bytes(earlier, snapshot(project, ["data/prepared", "artifacts/teacher"])))
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kd: error: cannot write cache shard"), res.stderr
    assert "File too large" in lines[0]
    store = next((project / ".kd/cache").iterdir())
    assert not list(store.glob("*.tmp"))  # the partial write was removed
    for shard in store.glob("*.npy"):  # whatever is left is complete and vouched for by its sidecar
        assert shard.with_name(shard.name + ".sha256").exists()
    assert not (project / "artifacts/logits").exists()  # nothing published

    again = kd(project, "stage", "cache_logits")
    assert again.returncode == 0, again.stderr
    assert "computed" in again.stdout
    assert run_cmd(project, str(BIN / "kd"), "cache", "verify", "artifacts/logits").returncode == 0
