"""Multi-teacher: the ensemble target, the ensemble model, and the params rules around them."""

import numpy as np
import pytest
import torch

from kd_core.config import parse_params
from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.losses import ensemble_targets
from kd_core.models import ModelSpec, build, ensemble, load, predict_logits, save

SCHEMA = Schema(features=tuple(f"f{i}" for i in range(6)), label_column="y", classes=("a", "b", "c"))
Z1 = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)
Z2 = np.array([[0.0, 1.0, 1.0], [-2.0, 4.0, 0.0]], np.float32)


def _takes():
    return [lambda idx: Z1[idx], lambda idx: Z2[idx]]


def test_logit_ensemble_is_the_mean_logit():
    out = ensemble_targets(_takes(), "logits", np.array([0, 1]))
    np.testing.assert_allclose(out, [[1.0, 0.5, 0.0], [-0.75, 2.25, 1.5]])


def test_probability_ensemble_is_the_mean_probability():
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    out = ensemble_targets(_takes(), "probs", np.array([1, 0]))
    np.testing.assert_allclose(softmax(out), (softmax(Z1[[1, 0]]) + softmax(Z2[[1, 0]])) / 2, rtol=1e-5)


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_the_student_learns_the_teacher_that_eval_scores(tmp_path, combine):
    """The cached target of an ensemble is the ensemble model's own output (it used to be combined at
    T for the student but at T = 1 for evaluation, so eval.json scored another teacher)."""
    x = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
    members = [(build(ModelSpec(a, o, SCHEMA), x, seed), ModelSpec(a, o, SCHEMA))
               for a, o, seed in (("mlp", {"hidden": [8]}, 0), ("mlp", {"hidden": [5]}, 1))]
    model, _ = ensemble(members, combine)
    cached = [predict_logits(m, x) for m, _ in members]  # what each member's cache holds
    target = ensemble_targets([lambda idx, c=c: c[idx] for c in cached], combine, np.arange(7))
    np.testing.assert_allclose(target, predict_logits(model, x), rtol=1e-5, atol=1e-6)


def test_ensemble_model_averages_its_members_and_round_trips(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
    members = [(build(ModelSpec(a, o, SCHEMA), x, seed), ModelSpec(a, o, SCHEMA))
               for a, o, seed in (("mlp", {"hidden": [8]}, 0), ("cnn1d", {"channels": 4}, 1))]
    for combine in ("logits", "probs"):
        model, spec = ensemble(members, combine)
        each = np.stack([predict_logits(m, x) for m, _ in members])  # (2, 5, 3)
        want = each.mean(0) if combine == "logits" else np.log(
            np.exp(torch.log_softmax(torch.from_numpy(each), -1).numpy()).mean(0))
        np.testing.assert_allclose(predict_logits(model, x), want, rtol=1e-5, atol=1e-6)
        save(model, spec, tmp_path / combine)
        loaded, loaded_spec = load(tmp_path / combine)
        assert loaded_spec.arch == "ensemble" and loaded_spec.options["combine"] == combine
        np.testing.assert_array_equal(predict_logits(loaded, x), predict_logits(model, x))


TEACHERS = [{"arch": "cnn1d"}, {"arch": "mlp", "options": {"hidden": [64]}}]


def test_teachers_give_a_directory_and_a_cache_each():
    p = parse_params({"teachers": TEACHERS})
    assert p.teacher_dirs() == ["artifacts/teacher/members/0", "artifacts/teacher/members/1"]
    assert p.logit_dirs() == ["artifacts/logits/0", "artifacts/logits/1"]
    assert [t.arch for t in p.teacher_list] == ["cnn1d", "mlp"]
    single = parse_params({})
    assert single.teacher_dirs() == ["artifacts/teacher"] and single.logit_dirs() == ["artifacts/logits"]


@pytest.mark.parametrize(("raw", "needle"), [
    ({"teachers": TEACHERS[:1]}, "two or more teachers"),
    ({"teachers": TEACHERS, "cache": {"top_k": 2}}, "needs a dense cache"),
    ({"teachers": [{"arch": "cnn1d", "epochs": 0}, TEACHERS[1]]}, "teachers.0.epochs"),
    ({"distill": {"ensemble": "median"}}, "distill.ensemble"),
])
def test_bad_teacher_lists_are_refused(raw, needle):
    with pytest.raises(UserError, match=needle):
        parse_params(raw)
