"""kill -9 in the middle of caching: the re-run keeps verified shards and ends byte-identical, for a
teacher returning raw logits and for the accelerator path (each batch encoded where computed, top-k)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kd_core.cache import build_cache, cache_key
from tests.reliability.conftest import Damage, lost_bytes, snapshot

COMPUTE = """
import time, torch
from kd_core.cache import CacheSettings, concat, encode_batch

def make(mode, slow=0.0):
    logits = torch.randn(4000, 50, generator=torch.Generator().manual_seed(1)) * 4
    s = CacheSettings("float16", 250, 8 if mode == "device" else None)

    def compute(a, b):
        time.sleep(slow)
        if mode == "raw":
            return logits[a:b]
        return concat([encode_batch(logits[i:min(i + 64, b)].clone(), [], s, 50, consume=True)
                       for i in range(a, b, 64)])
    return compute, s
"""
exec(COMPUTE)  # the test's own resume uses the same compute as the killed process

SCRIPT = COMPUTE + """
import sys
from pathlib import Path
from kd_core.cache import build_cache, cache_key

root, slow, mode = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
compute, s = make(mode, slow)
build_cache(compute, 4000, 50, root / "out", root / "work", cache_key("t", "d", s), s, {})
"""


def build(root: Path, slow: float, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), str(slow), mode])


@pytest.mark.parametrize("mode", ["raw", "device"])
@pytest.mark.fault("kill -9 mid logit capture")
def test_sigkill_mid_capture_then_resume_is_byte_identical(tmp_path: Path, tally: Damage, mode: str) -> None:
    proc = build(tmp_path / "crash", 0.15, mode)
    store = tmp_path / "crash" / "work" / "cache"
    deadline = time.time() + 60
    roles = len(make(mode)[1].roles())  # noqa: F821 (defined by exec above); files per shard
    while time.time() < deadline and len(list(store.glob("*/*.sha256"))) < 4 * roles:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(store.glob("*/*.sha256"))) // roles
    assert 4 <= finished < 16, finished  # really killed mid-capture
    assert not (tmp_path / "crash" / "out").exists()  # nothing half-published

    compute, s = make(mode)  # noqa: F821 (defined by exec above)
    calls = []
    report = build_cache(lambda a, b: calls.append(a) or compute(a, b), 4000, 50, tmp_path / "crash" / "out",
                         tmp_path / "crash" / "work", cache_key("t", "d", s), s, {})
    assert report.reused >= finished - 1 and report.computed == len(calls) == 16 - report.reused

    assert build(tmp_path / "clean", 0.0, mode).wait() == 0
    tally.lost(lost_bytes(snapshot(tmp_path / "clean", ["out"]), snapshot(tmp_path / "crash", ["out"])))
    clean = sorted(p.name for p in (tmp_path / "clean" / "out").iterdir())
    assert clean == sorted(p.name for p in (tmp_path / "crash" / "out").iterdir())
    for name in clean:  # shards and manifest alike
        assert (tmp_path / "clean/out" / name).read_bytes() == (tmp_path / "crash/out" / name).read_bytes(), name
