"""The int8 edge model: recipes chosen by measurement on training rows, the QAD simulation, the int8 rules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kd_core import export, models, policy, qad, quantize, tasks
from kd_core.config import ExportParams, Params, PolicyParams
from kd_core.data import Schema, Splits
from kd_core.errors import UserError
from kd_core.stages._common import validation_rows
from kd_core.stages.export import int8_samples

SCHEMA = Schema(tuple(f"f{i}" for i in range(4)), "y", (0, 1, 2))


def _candidate(agreement: float, size: int, diff: float = 0.1, method: str = "minmax") -> quantize.Candidate:
    return quantize.Candidate(method, (), "uint8", agreement, diff, diff * 10, size)


def test_within_size_and_agreement_the_smallest_logit_error_ships() -> None:
    big = _candidate(1.0, 300, 0.01)  # the closest, but over the size budget
    sure, closer_unsure = _candidate(0.995, 100, 0.2), _candidate(0.98, 100, 0.1)
    finer = _candidate(0.992, 90, 0.15)
    assert quantize._best([big, sure, closer_unsure, finer], 0.99, 200) is finer
    # a small file that changes the student's answers loses to a bigger one that keeps them (a transformer's
    # static int8 against its weight-only dynamic form): agreement first, then the size budget
    assert quantize._best([big, closer_unsure], 0.99, 200) is big
    closest = _candidate(0.5, 300, 0.05)
    assert quantize._best([closer_unsure, closest], 0.99, 200) is closest  # none agrees: the closest, any size
    assert quantize._best([big], 0.99, 200) is big  # none fits: all are considered


def _mlp_onnx(tmp_path: Path, x: np.ndarray) -> tuple[Path, nn.Module]:
    spec = models.ModelSpec("mlp", {"hidden": [32, 16]}, SCHEMA)
    model = models.build(spec, x, seed=0)
    path = tmp_path / export.ONNX_FILE
    export.to_onnx(model, tasks.get("tabular"), spec, path)
    return path, model


def _opener(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    return functools.partial(export._run_onnx, export.session(path, 1))


def test_every_recipe_and_repair_is_measured_and_the_reported_file_is_written(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    src, _ = _mlp_onnx(tmp_path, x)
    ref = export._run_onnx(export.session(src, 1), x[128:])

    def run(path: Path, rows: np.ndarray) -> np.ndarray:
        return export._run_onnx(export.session(path, 1), rows)
    best, tried = quantize.choose_int8(src, tmp_path / "q.onnx", ("minmax", "dynamic"), "features", x[:128],
                                       x[128:], src, _opener, 48, 0.0, 10.0)  # 128 rows scored 48 at a time
    nodes = quantize.weight_nodes(src)
    assert [(c.method, c.kept_float, c.activations) for c in tried] == [
        ("minmax", (), "uint8"), ("minmax", (nodes[0], nodes[-1]), "uint8"), ("minmax", (), "uint16"),
        ("dynamic", (), "dynamic"), ("dynamic", (nodes[0], nodes[-1]), "dynamic"), ("dynamic_matmul", (), "dynamic"),
        ("dynamic_matmul", (nodes[0], nodes[-1]), "dynamic")]  # weight-only forms always measured, edges in float too
    assert best == min(tried, key=lambda c: (c.mean_abs_logit_diff, -c.agreement, c.size_bytes))
    got = run(tmp_path / "q.onnx", x[128:])  # the file written is the one reported
    assert (got.argmax(1) == ref.argmax(1)).mean() == pytest.approx(best.agreement)
    assert np.abs(got - ref).mean() == pytest.approx(best.mean_abs_logit_diff, rel=1e-5)


def test_calibration_and_selection_rows_are_trained_rows_never_test_or_validation() -> None:
    rng = np.random.default_rng(1)
    frame = lambda n, start, labelled=True: pd.DataFrame(  # noqa: E731 - unique row ids in column f0
        {**{f"f{i}": (np.arange(start, start + n) if i == 0 else rng.normal(size=n)) for i in range(4)},
         **({"y": rng.integers(0, 3, n)} if labelled else {})})
    splits = Splits(frame(200, 0), frame(100, 10_000), frame(300, 20_000, False), SCHEMA)
    params = Params().model_copy(update={"export": ExportParams(calibration_rows=150, selection_rows=1000)})
    calib, select = int8_samples(params, tasks.get("tabular"), splits)
    ids_c, ids_s = set(calib[:, 0].astype(int)), set(select[:, 0].astype(int))
    val = set(validation_rows(200, params.train.val_fraction, params.train.seed).tolist())
    assert len(ids_c) == 150 and ids_c.isdisjoint(ids_s)
    for ids in (ids_c, ids_s):
        assert not any(10_000 <= i < 20_000 for i in ids)  # no test row
        assert ids.isdisjoint(val)  # no held-out validation row
    assert len(ids_c | ids_s) == 200 - len(val) + 300  # every trained row is used once


def test_qad_simulates_int8_and_release_gives_the_plain_module_back() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    plain_keys = set(net.state_dict())
    x = torch.randn(64, 6)
    before = net(x).detach()
    assert qad.simulate(net) == 2
    assert {f"0.{qad.RANGE}", f"2.{qad.RANGE}"} <= set(net.state_dict())  # ranges travel in checkpoints
    net.train()
    sim = net(x).detach()  # the first batch sets the ranges
    assert 0 < (sim - before).abs().max() < 0.1  # rounded, not broken
    w = net[0].weight.detach()
    q = qad.fake_weight(w)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(q / scale, torch.round(q / scale), atol=1e-3)  # on the int8 grid per channel
    out = net(x)
    out.sum().backward()
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0  # straight-through gradients
    qad.release(net)
    assert set(net.state_dict()) == plain_keys
    assert torch.equal(net(x), nn.functional.linear(torch.relu(net[0](x)), net[2].weight, net[2].bias))


def test_qad_keeps_tied_weights_tied() -> None:
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    qad.simulate(model)
    qad.release(model)
    assert model["head"].weight is model["emb"].weight


@pytest.mark.parametrize(("drop", "size", "decision", "failed"), [
    (None, None, "promoted", []),
    (0.01, None, "promoted", []),
    (0.005, None, "rejected", ["int8_accuracy_drop"]),
    (None, 50_000, "rejected", ["int8_size_bytes"]),
])
def test_int8_rules(drop: float | None, size: int | None, decision: str, failed: list[str]) -> None:
    rules = PolicyParams(max_int8_accuracy_drop=drop, max_int8_size_bytes=size)
    d = policy.decide_int8(0.870, 0.862, 60_000, rules)
    assert d.decision == decision
    assert [r.split()[0] for r in d.reasons if r.endswith("fail")] == failed
    assert len(d.reasons) == 2 and all("\n" not in r for r in d.reasons)


@pytest.mark.parametrize(("rise", "perplexity", "decision"), [
    (0.02, (100.0, 101.9), "promoted"), (0.02, (100.0, 102.5), "rejected"), (None, (100.0, 350.0), "promoted")])
def test_lm_int8_is_judged_on_perplexity(rise: float | None, perplexity: tuple[float, float], decision: str) -> None:
    rules = PolicyParams(max_int8_accuracy_drop=None, max_int8_perplexity_increase=rise)
    d = policy.decide_int8(0.31, 0.30, 60_000, rules, perplexity)
    assert d.decision == decision and d.reasons[-1].startswith("int8_perplexity_increase")
    assert len(policy.decide_int8(0.31, 0.30, 60_000, rules).reasons) == 2  # classifiers: no perplexity rule


def test_a_recipe_the_quantizer_refuses_is_recorded_and_never_chosen(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(0).normal(size=(128, 4)).astype(np.float32)
    src, _ = _mlp_onnx(tmp_path, x)
    real = quantize.quantize

    def picky(src_: Path, dst: Path, method: str, *args: object) -> None:
        if method == "entropy":  # as ONNX Runtime's histogram calibrators do on a constant tensor
            raise ValueError("Too many bins for data range. Cannot create 128 finite-sized bins.")
        real(src_, dst, method, *args)
    monkeypatch.setattr(quantize, "quantize", picky)
    best, tried = quantize.choose_int8(src, tmp_path / "q.onnx", ("entropy", "minmax"), "features", x[:64], x[64:],
                                       src, _opener, 64, 0.99, 0.34)
    refused = [c for c in tried if c.error]
    assert len(refused) == 3 and all(c.method == "entropy" and "Too many bins" in c.error for c in refused)
    assert best.method != "entropy" and best.error is None
    monkeypatch.setattr(quantize, "DYNAMIC", {})  # nothing left that applies
    with pytest.raises(UserError, match=r"^no int8 recipe applies to model.onnx: entropy: ValueError: Too many"):
        quantize.choose_int8(src, tmp_path / "r.onnx", ("entropy",), "features", x[:64], x[64:], src, _opener, 64,
                             0.99, 0.34)
