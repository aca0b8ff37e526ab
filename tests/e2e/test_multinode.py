"""Two machines train one student (train.nnodes: 2): two `kd stage train_student` processes on this host,
node ranks 0 and 1, meeting at a c10d rendezvous on a free local port, in two copies of the project
(no shared filesystem). Machine 1 is killed mid-training: machine 0 must fail with one line; both are
run again and training resumes from machine 0's checkpoint. Then: machine 0 alone wrote the outputs,
and the student is as accurate as a one-process run's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from kd_core import data, models
from kd_core.config import load_params
from kd_core.curves import read_curve
from kd_core.stages import cache_logits, prepare, teacher, train_student
from kd_core.train import CHECKPOINT_META, checkpoint_epochs
from tests.conftest import BIN, TINY, deep_update, new_project, write_params

pytestmark = pytest.mark.slow

EPOCHS = 12  # ~0.2 s each on two ranks: a window of several epochs to kill machine 1 in
KILL_AFTER = 2  # epochs in machine 0's checkpoint when machine 1 goes down
CONFIG = deep_update(dict(TINY), {"train": {"epochs": EPOCHS, "device": "cpu"}})
STORE = Path(".kd/train/train_student")  # the student's checkpoints, under each project
OUTPUTS = (Path("artifacts/student"), Path("metrics/train_student.csv"))


@contextmanager
def _one_thread() -> Iterator[None]:
    """Stages run in this process on one thread, as the CLI's ranks do: on a busy 2-core machine two
    threads per process make every step wait for a descheduled one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ready(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared data, a teacher and its logit cache (built in this process: only training is under test)."""
    proj = new_project(tmp_path_factory.mktemp("ready") / "proj", CONFIG)
    with _one_thread():
        for stage in (prepare, teacher, cache_logits):
            stage.run(load_params(proj), proj)
    return proj


def _copy(ready: Path, dest: Path, train: dict | None = None) -> Path:
    subprocess.run(["cp", "-a", str(ready), str(dest)], check=True)
    if train:
        write_params(dest, {"train": train})
    return dest


def _test_accuracy(project: Path) -> float:
    splits = data.read_prepared(project / "data/prepared")
    model, _ = models.load(project / "artifacts/student")
    pred = models.predict_logits(model, data.features_array(splits.test, splits.schema)).argmax(1)
    return float(np.mean(pred == data.label_indices(splits.test, splits.schema)))


@pytest.fixture(scope="module")
def one_process(ready: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = _copy(ready, tmp_path_factory.mktemp("one") / "proj")
    with _one_thread():
        train_student.run(load_params(proj), proj)
    return proj


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(node_rank: int) -> dict[str, str]:
    """Machine `node_rank`'s environment: its node rank from KD_NODE_RANK (both read one params.yaml),
    gloo over the loopback interface, one thread per rank, no DAG run to log to."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    return env | {"KD_NODE_RANK": str(node_rank), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _start(projects: tuple[Path, Path]) -> list[subprocess.Popen]:
    """`kd stage train_student` on both machines, each in a session of its own."""
    return [subprocess.Popen([str(BIN / "kd"), "stage", "train_student"], cwd=p, env=_env(i), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            for i, p in enumerate(projects)]


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants: torchrun starts each rank in a session of its own, so a machine going
    down is every process under its `kd stage`, not one process group."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread has just ended
            continue
    return [pid, *(d for c in children for d in _process_tree(c))]


def _ckpt_epochs(project: Path) -> int:
    return max((checkpoint_epochs(p) for p in (project / STORE).glob("*.safetensors")), default=0)


@dataclass
class Killed:
    """What machine 0 saw when machine 1 went down."""

    returncode: int
    stderr: str
    checkpoint: list[dict[str, float]]  # the history in machine 0's checkpoint after the failure


@dataclass
class Rerun:
    """Both machines' output of the run after the kill."""

    stdout: tuple[str, str]


@pytest.fixture(scope="module")
def machines(ready: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("machines")
    train = {"nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{_free_port()}"}
    return _copy(ready, base / "node0", train), _copy(ready, base / "node1", train)


@pytest.fixture(scope="module")
def killed(machines: tuple[Path, Path]) -> Killed:
    node0, node1 = _start(machines)
    deadline = time.time() + 240
    while _ckpt_epochs(machines[0]) < KILL_AFTER:
        assert node0.poll() is None and node1.poll() is None, (node0.stderr.read()[-2000:], node1.stderr.read()[-2000:])
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    for pid in _process_tree(node1.pid):
        os.kill(pid, signal.SIGKILL)
    node1.communicate()
    _, err = node0.communicate(timeout=120)
    [ckpt] = (machines[0] / STORE).glob("*.safetensors")
    with safe_open(str(ckpt), "pt") as f:
        history = json.loads(f.metadata()[CHECKPOINT_META])["history"]
    return Killed(node0.returncode, err, history)


@pytest.fixture(scope="module")
def rerun(machines: tuple[Path, Path], killed: Killed) -> Rerun:
    procs = _start(machines)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return Rerun((outs[0][0], outs[1][0]))


def test_killing_one_machine_fails_the_other_with_one_line(machines: tuple[Path, Path], killed: Killed) -> None:
    assert killed.returncode != 0
    last = killed.stderr.strip().splitlines()[-1]
    assert last.startswith("kd: error: training on machine 0 of 2") and "resume" in last, last
    assert KILL_AFTER <= len(killed.checkpoint) < EPOCHS  # really killed mid-training
    assert not any((machines[0] / o).exists() for o in OUTPUTS)  # nothing half-published


def test_running_both_again_resumes_from_the_checkpoint(machines: tuple[Path, Path], killed: Killed,
                                                        rerun: Rerun) -> None:
    curve = read_curve(machines[0] / OUTPUTS[1])
    assert len(curve) == EPOCHS
    done = len(killed.checkpoint)
    # the epochs before the kill come from the checkpoint, timings and all: they were not trained again
    assert [r["seconds"] for r in curve[:done]] == [r["seconds"] for r in killed.checkpoint]
    assert "on 2 processes" in rerun.stdout[0], rerun.stdout[0]
    assert "machine 1 of 2" in rerun.stdout[1], rerun.stdout[1]
    assert not (machines[0] / STORE).exists()  # a finished run leaves no checkpoint behind


def test_machine_0_alone_writes_checkpoints_and_outputs(machines: tuple[Path, Path], rerun: Rerun) -> None:
    node0, node1 = machines
    assert all((node0 / o).exists() for o in OUTPUTS)
    assert not any((node1 / o).exists() for o in OUTPUTS)
    assert not (node1 / STORE).exists()  # machine 1 resumed from machine 0's checkpoint, sent to it


def test_two_machines_reach_the_accuracy_of_one_process(machines: tuple[Path, Path], rerun: Rerun,
                                                        one_process: Path) -> None:
    single, two = _test_accuracy(one_process), _test_accuracy(machines[0])
    assert single > 0.4  # the student learned something (12 tiny epochs; chance is 0.1)
    assert abs(two - single) <= 0.01, (single, two)
