"""Model directories and user checkpoints: safe loading, clear mismatches."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import ModelSpec, build, load, load_checkpoint, predict_logits, save

SCHEMA = Schema(("a", "b", "c", "d"), "y", ("x", "y", "z"))


@pytest.mark.parametrize("arch,options", [("mlp", {"hidden": [8]}), ("cnn1d", {"channels": 4})])
def test_save_load_round_trip_keeps_scaling(tmp_path, arch, options):
    spec = ModelSpec(arch, options, SCHEMA)
    x = np.random.default_rng(0).normal(5, 3, size=(50, 4)).astype(np.float32)
    model = build(spec, x, seed=0)
    save(model, spec, tmp_path / "m")
    loaded, spec2 = load(tmp_path / "m")
    assert spec2 == spec
    np.testing.assert_allclose(predict_logits(loaded, x), predict_logits(model, x), rtol=1e-6)
    assert loaded.scale.mean.abs().sum() > 0  # the standardisation travels with the weights


def test_seeded_build_is_repeatable():
    spec = ModelSpec("mlp", {"hidden": [8]}, SCHEMA)
    a, b = build(spec, seed=3), build(spec, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "lightning"])
def test_user_checkpoint_formats(tmp_path, fmt):
    spec = ModelSpec("mlp", {"hidden": [8]}, SCHEMA)
    net = build(spec, seed=1).net
    state = net.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state} if fmt == "lightning" else state, path)
    model = load_checkpoint(path, spec)
    x = torch.randn(5, 4)
    assert torch.allclose(model(x), net(x))  # identity scaling: the checkpoint saw raw rows


def test_checkpoint_for_another_architecture_names_the_keys(tmp_path):
    torch.save({"0.weight": torch.zeros(3, 3)}, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"does not match architecture 'cnn1d'.*missing .*unexpected \['0.weight'\]"):
        load_checkpoint(tmp_path / "w.pt", ModelSpec("cnn1d", {}, SCHEMA))


def test_malicious_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "w.pt").write_bytes(pickle.dumps({"0.weight": Exploit()}))
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(tmp_path / "w.pt", ModelSpec("mlp", {}, SCHEMA))
    assert not marker.exists()


def test_unknown_architecture_lists_choices():
    with pytest.raises(UserError, match=r"choose one of \['cnn1d', 'ensemble', 'mlp'\]"):
        build(ModelSpec("resnet", {}, SCHEMA))


def test_model_json_records_the_task_and_older_directories_load_as_tables(tmp_path):
    """Serving asks the model's own task how to read raw inputs, so the task travels in model.json."""
    import json

    from kd_core import models as m
    from kd_core.data import Schema

    spec = m.ModelSpec("mlp", {"hidden": [4]}, Schema(("a", "b"), "y", (0, 1)))
    m.save(m.build(spec), spec, tmp_path / "new")
    assert json.loads((tmp_path / "new" / m.META_FILE).read_text())["task"] == "tabular"
    meta = json.loads((tmp_path / "new" / m.META_FILE).read_text())
    del meta["task"]  # a directory written before tasks existed
    (tmp_path / "new" / m.META_FILE).write_text(json.dumps(meta))
    assert m.load(tmp_path / "new")[1].task == "tabular"
