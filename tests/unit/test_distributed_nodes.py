"""Several machines (train.nnodes): the params that launch them, the torchrun command, and — in two
gloo processes standing for two machines — which process writes, how a checkpoint reaches the other
machine, and the refusals when machines disagree."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from kd_core import distributed
from kd_core.config import Params, parse_params
from kd_core.errors import UserError
from kd_core.stages import train_student


@pytest.mark.parametrize("train,needle", [
    ({"nnodes": 2}, "set it"),
    ({"rdzv_endpoint": "a:29500"}, "only for train.nnodes > 1"),
    ({"nnodes": 2, "rdzv_endpoint": "a"}, "expected host:port"),
    ({"nnodes": 2, "rdzv_endpoint": "a:70000"}, "expected host:port"),
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "a:29500"}, "must be below train.nnodes"),
])
def test_a_multi_machine_setting_that_cannot_launch_is_one_line(train: dict, needle: str) -> None:
    with pytest.raises(UserError) as err:
        parse_params({"train": train})
    assert needle in str(err.value) and "train" in str(err.value)
    assert "\n" not in str(err.value)


def test_one_machine_is_standalone_and_several_meet_at_the_endpoint() -> None:
    one = distributed.torchrun_command(distributed.Plan(4), ["-m", "x"])
    assert "--standalone" in one and "--nproc-per-node=4" in one and one[-2:] == ["-m", "x"]
    two = distributed.torchrun_command(distributed.Plan(2, 3, 1, "h:29500", "job"), ["-m", "x"])
    assert {"--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=h:29500", "--rdzv-id=job",
            "--nproc-per-node=2"} <= set(two)
    assert "--standalone" not in two and not any(a.startswith("--node") and "rank" in a for a in two)


def test_kd_node_rank_overrides_the_param_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert distributed.node_rank(1, 2) == 1
    monkeypatch.setenv(distributed.NODE_RANK_ENV, "0")
    assert distributed.node_rank(1, 2) == 0
    for bad in ("2", "-1", "one"):
        monkeypatch.setenv(distributed.NODE_RANK_ENV, bad)
        with pytest.raises(UserError, match="node rank from 0 to 1"):
            distributed.node_rank(0, 2)


def test_the_job_is_the_same_on_every_machine_and_differs_between_jobs() -> None:
    """Node rank and endpoint say where a machine trains, not what: the same rendezvous id (and
    checkpoint key) whatever they are, another one for other params."""
    def params(**train: object) -> Params:
        return Params.model_validate({"train": {"nnodes": 2, "rdzv_endpoint": "a:1", **train}})

    job = train_student.job_id(params())
    assert train_student.job_id(params(node_rank=1, rdzv_endpoint="b:2")) == job
    assert train_student.job_id(params(epochs=7)) != job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine(rank: int, ports: list[int], tmp: str) -> None:
    """Rank `rank` of two, on its own machine (local rank 0), claiming node rank 1 - rank: the
    rendezvous's order is not the node ranks'. Then both claim node rank 0."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    mine = Path(tmp) / f"disk{rank}" / "ckpt"  # each machine's own disk: only node rank 0's holds a file
    if rank == 1:
        mine.parent.mkdir()
        mine.write_bytes(b"epoch 3")
    seen: dict[str, object] = {}
    os.environ["MASTER_PORT"] = str(ports[0])
    with distributed.process_group("cpu", node=1 - rank):
        seen["writes"] = distributed.writes()
        got = distributed.lead_bytes(mine)
        seen["bytes"] = got.decode() if got is not None else None
        distributed.check_same("same inputs", "inputs")
        try:
            distributed.check_same(f"inputs of {rank}", "the inputs")
        except UserError as exc:
            seen["differ"] = str(exc)
    os.environ["MASTER_PORT"] = str(ports[1])
    try:
        with distributed.process_group("cpu", node=0):
            pass
    except UserError as exc:
        seen["twice"] = str(exc)
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(seen))


def test_node_rank_0_writes_and_sends_its_checkpoint_and_disagreements_stop_every_machine(tmp_path: Path) -> None:
    mp.spawn(_machine, args=([_free_port(), _free_port()], str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["writes"], r1["writes"]) == (False, True)  # node rank 0 is global rank 1 here
    assert r0["bytes"] == r1["bytes"] == "epoch 3"  # machine 1 resumes from machine 0's file
    assert "the inputs differ between machines" in r0["differ"] and r0["differ"] == r1["differ"]
    assert "2 processes claim local rank 0 of node rank 0" in r0["twice"] and r0["twice"] == r1["twice"]
