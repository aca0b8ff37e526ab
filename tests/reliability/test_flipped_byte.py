"""One flipped byte in a published logit shard, through the real CLI: `kd cache verify` names the shard,
training refuses it with one line instead of learning from wrong soft labels, and re-running
`cache_logits` recomputes that shard alone, back to the original bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import kd
from tests.reliability.conftest import Damage, lost_bytes, snapshot

pytestmark = pytest.mark.slow
EARLIER = ("data/prepared", "artifacts/teacher", "artifacts/logits")


def _ok(project: Path, *args: str) -> str:
    res = kd(project, *args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def _one_error(res: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kd: error:")]
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    return errors[0]


@pytest.mark.fault("flipped byte in a cache shard")
def test_flipped_byte_is_caught_refused_and_rebuilt_alone(project: Path, tally: Damage) -> None:
    for stage in ("prepare", "teacher", "cache_logits"):
        _ok(project, "stage", stage)
    before = snapshot(project, EARLIER)
    shards = sorted((project / "artifacts/logits").glob("shard-*.npy"))
    assert len(shards) >= 3, shards
    victim = shards[len(shards) // 2]
    with victim.open("r+b") as f:  # in place: whatever shares the inode (the store's copy) flips too
        f.seek(-7, 2)
        byte = f.read(1)
        f.seek(-7, 2)
        f.write(bytes([byte[0] ^ 0x10]))

    verify = _one_error(kd(project, "cache", "verify", "artifacts/logits"))
    assert victim.stem.split(".")[0] in verify and "checksum" in verify, verify
    train = _one_error(kd(project, "stage", "train_student"))
    assert "checksum" in train, train
    assert not (project / "artifacts/student").exists()  # nothing trained on wrong soft labels

    rebuilt = _ok(project, "stage", "cache_logits")
    tally.lost(lost_bytes(before, snapshot(project, EARLIER)))
    assert f"(1 computed, {len(shards) - 1} resumed)" in rebuilt, rebuilt
    assert snapshot(project, EARLIER) == before  # byte for byte the cache it was
    _ok(project, "cache", "verify", "artifacts/logits")
    _ok(project, "stage", "train_student")
