"""Feature distillation: hook capture, cached features, hint losses, projections, config-time errors."""

import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from kd_core import features, models
from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key, settings, verify_cache
from kd_core.config import DistillParams, parse_params
from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.losses import attention_transfer, hint_cosine, hint_mse, l2_penalty
from kd_core.train import FitConfig, fit

SCHEMA = Schema(tuple(f"x{i}" for i in range(40)), "label", tuple(range(10)))
CAPTURES = (("net.convs.3", "none"), ("net.convs.5", "mean"))  # (B, 8, 10) unpooled, (B, 8) pooled


def _cnn(channels: int = 8, seed: int = 0) -> models.KDModel:
    return models.build(models.ModelSpec("cnn1d", {"channels": channels}, SCHEMA), seed=seed)


def _rows(n: int = 700) -> torch.Tensor:
    return torch.randn(n, 40, generator=torch.Generator().manual_seed(1))


def _teacher_compute(teacher: models.KDModel, x: torch.Tensor, captures=CAPTURES):
    """What cache_logits does: logits and pooled activations from the same forward pass."""
    @torch.inference_mode()
    def compute(a: int, b: int):
        with features.captured(teacher, [m for m, _ in captures]) as acts:
            out = teacher(x[a:b])
            return out, [features.pool(acts[m], p) for m, p in captures]
    return compute


def _build(tmp_path, compute, n=700, dtype="float32", shapes=((8, 10), (8,)), captures=CAPTURES):
    s = CacheSettings(dtype, 300, None, captures)
    key = cache_key("teacher", "data", s)
    report = build_cache(compute, n, 10, tmp_path / "cache", tmp_path / "work", key, s, {},
                         feature_shapes=shapes)
    return report, key


# --- capture --------------------------------------------------------------------------------------

def test_hook_capture_is_exactly_the_module_output():
    model, x = _cnn().eval(), _rows(5)
    with torch.no_grad(), features.captured(model, ["net.convs.1", "net.head"]) as acts:
        logits = model(x)
        h = model.net.convs[1](model.net.convs[0](model.scale(x).unsqueeze(1)))  # (B, C, L) by hand
    assert torch.equal(acts["net.convs.1"], h)
    assert torch.equal(acts["net.head"], logits)
    assert not model.net.convs[1]._forward_hooks  # the hooks are gone once the block closes


def test_capture_survives_a_later_in_place_op():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(inplace=True))
    x = torch.randn(5, 3)
    with torch.no_grad(), features.captured(net, ["0"]) as acts:
        net(x)
        assert torch.equal(acts["0"], net[0](x))  # pre-activation, negatives included
    assert (acts["0"] < 0).any()


def test_pooling():
    x = torch.arange(12.0).reshape(1, 2, 6)  # (B, C, L)
    assert torch.equal(features.pool(x, "mean"), torch.tensor([[2.5, 8.5]]))
    assert torch.equal(features.pool(x, "max"), torch.tensor([[5.0, 11.0]]))
    assert features.pool(x, "none") is x
    v = torch.randn(3, 4)
    assert features.pool(v, "mean") is v  # a vector has no positions to pool


def test_probe_gives_per_row_shapes():
    assert features.probe(_cnn(), CAPTURES, torch.zeros(2, 40)) == ((8, 10), (8,))


# --- the cache ------------------------------------------------------------------------------------

def test_cached_features_round_trip_bit_exactly(tmp_path):
    teacher, x = _cnn().eval(), _rows()
    report, key = _build(tmp_path, _teacher_compute(teacher, x))
    cache = LogitCache(tmp_path / "cache", key)
    idx = np.array([699, 0, 300, 299, 512])
    with torch.no_grad(), features.captured(teacher, ["net.convs.3", "net.convs.5"]) as acts:
        logits = teacher(x[idx])
    assert np.array_equal(cache.take_feature(idx, "net.convs.3"), acts["net.convs.3"].numpy())
    assert np.array_equal(cache.take_feature(idx, "net.convs.5"), acts["net.convs.5"].mean(-1).numpy())
    assert np.array_equal(cache.take(idx), logits.numpy())
    m = cache.manifest
    assert [(f["module"], f["pool"], f["shape"]) for f in m["features"]] == [
        ("net.convs.3", "none", [8, 10]), ("net.convs.5", "mean", [8])]
    assert m["bytes_per_row"] == report.bytes_per_row == 4 * (10 + 80 + 8)
    assert verify_cache(tmp_path / "cache") == []


def test_features_follow_the_cache_dtype(tmp_path):
    teacher, x = _cnn().eval(), _rows()
    _, key = _build(tmp_path, _teacher_compute(teacher, x), dtype="bfloat16")
    cache = LogitCache(tmp_path / "cache", key)
    with torch.no_grad(), features.captured(teacher, ["net.convs.3"]) as acts:
        teacher(x[:4])
    np.testing.assert_array_equal(cache.take_feature(np.arange(4), "net.convs.3"),
                                  acts["net.convs.3"].to(torch.bfloat16).float().numpy())
    assert cache.manifest["bytes_per_row"] == 2 * (10 + 80 + 8)


def test_feature_shards_resume_and_rerun_byte_identically(tmp_path):
    teacher, x = _cnn().eval(), _rows()
    compute = _teacher_compute(teacher, x)

    def crashing(a, b):
        if a >= 600:
            raise KeyboardInterrupt  # a crash after two of three shards
        return compute(a, b)

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "crash", crashing)
    (tmp_path / "crash/work/cache").iterdir().__next__().joinpath("shard-00001.feature0.npy").unlink()
    calls = []
    report, _ = _build(tmp_path / "crash", lambda a, b: calls.append(a) or compute(a, b))
    assert calls == [300, 600] and (report.computed, report.reused) == (2, 1)  # shard 1 lost a feature file
    _build(tmp_path / "clean", compute)
    for f in sorted((tmp_path / "clean" / "cache").iterdir()):
        assert f.read_bytes() == (tmp_path / "crash" / "cache" / f.name).read_bytes(), f.name


def test_verify_catches_a_flipped_byte_in_a_feature_shard_and_a_rerun_repairs_it(tmp_path):
    teacher, x = _cnn().eval(), _rows()
    compute = _teacher_compute(teacher, x)
    _, key = _build(tmp_path, compute)
    shard = tmp_path / "cache" / "shard-00002.feature0.npy"
    clean = shard.read_bytes()
    raw = bytearray(clean)
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))  # in place: the published file and the store share the inode
    problems = verify_cache(tmp_path / "cache")
    assert len(problems) == 1 and "shard-00002.feature0" in problems[0] and "checksum" in problems[0]
    with pytest.raises(UserError, match="checksum"):
        LogitCache(tmp_path / "cache", key).take_feature(np.array([650]), "net.convs.3")
    calls = []
    report, _ = _build(tmp_path, lambda a, b: calls.append(a) or compute(a, b))
    assert calls == [600] and shard.read_bytes() == clean and verify_cache(tmp_path / "cache") == []


def test_wrong_feature_shapes_or_non_finite_features_are_refused(tmp_path):
    teacher, x = _cnn().eval(), _rows()
    with pytest.raises(UserError, match="shapes"):
        _build(tmp_path / "a", _teacher_compute(teacher, x), shapes=((8, 9), (8,)))

    def bad(a, b):
        logits, feats = _teacher_compute(teacher, x)(a, b)
        return logits, [feats[0], feats[1].clone().fill_(float("nan"))]

    with pytest.raises(UserError, match="non-finite"):
        _build(tmp_path / "b", bad)


# --- keys -----------------------------------------------------------------------------------------

FEATURES = {"cache": {"features": [{"module": "net.convs.5", "pool": "mean"}]},
            "distill": {"features": [{"teacher": "net.convs.5", "student": "net.2", "weight": 1.0}]}}


def test_cache_features_change_the_key_and_hint_weights_do_not():
    plain = parse_params({})
    assert settings(plain).to_json() == {"dtype": "float32", "shard_rows": 16384, "top_k": None}  # key as before
    with_features = parse_params(FEATURES)
    pooled_max = parse_params({**FEATURES, "cache": {"features": [{"module": "net.convs.5", "pool": "max"}]}})
    reweighted = parse_params({**FEATURES, "distill": {"features": [
        {"teacher": "net.convs.5", "student": "net.0", "loss": "cosine", "weight": 5.0}]}})
    keys = [cache_key("t", "d", settings(p)) for p in (plain, with_features, pooled_max, reweighted)]
    assert len({keys[0], keys[1], keys[2]}) == 3
    assert keys[3] == keys[1]


# --- losses against hand computations -------------------------------------------------------------

def test_hint_mse_by_hand():
    s, t = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert hint_mse(s, t).tolist() == pytest.approx([(0 + 4 + 9) / 3, 1.0])


def test_hint_cosine_by_hand():
    s, t = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]]), torch.tensor([[0.0, 3.0], [1.0, 0.0], [-1.0, 0.0]])
    assert hint_cosine(s, t).tolist() == pytest.approx([1.0, 1 - 1 / math.sqrt(2), 2.0])


def test_attention_transfer_by_hand():
    s = torch.tensor([[[1.0, 2.0], [0.0, 2.0]]])  # (B=1, C=2, L=2): Q_s = [1, 8]
    t = torch.tensor([[[3.0, 0.0], [0.0, 0.0], [4.0, 0.0]]])  # (1, 3, 2): Q_t = [25, 0]; width may differ
    q_s, q_t = [1 / math.sqrt(65), 8 / math.sqrt(65)], [1.0, 0.0]
    want = ((q_s[0] - q_t[0]) ** 2 + (q_s[1] - q_t[1]) ** 2) / 2
    assert attention_transfer(s, t).item() == pytest.approx(want)


def test_l2_penalty_counts_weights_not_biases():
    net = torch.nn.Linear(2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 4.0]]))
        net.bias.fill_(10.0)
    assert l2_penalty(net).item() == 25.0


def test_mse_l2_preset_adds_lambda_w_squared_once_per_batch():
    student = _cnn(4)
    net = features.HintedStudent(student, [], l2=0.01)
    per_row = net.extra_loss([], rows=6)
    torch.testing.assert_close(per_row.mean(), 0.01 * l2_penalty(student))
    assert DistillParams(loss="mse_l2").l2 > 0


# --- projections ----------------------------------------------------------------------------------

def test_projection_kinds():
    assert features.projection((8,), (8,), "mse", "h") is None
    lin = features.projection((256,), (8, 5), "mse", "h")
    assert lin(torch.zeros(3, 256)).shape == (3, 8, 5)
    conv = features.projection((4, 5), (8, 5), "cosine", "h")
    assert isinstance(conv, torch.nn.Conv1d) and conv.kernel_size == (1,)
    assert features.projection((4, 5), (8, 5), "attention", "h") is None  # channel-free maps
    with pytest.raises(UserError, match="cannot project"):
        features.projection((4, 10), (8, 5), "mse", "h")
    with pytest.raises(UserError, match="same positions"):
        features.projection((16,), (8, 5), "attention", "h")


def _hinted_student(tmp_path, hint_loss="mse"):
    teacher, x = _cnn(8).eval(), _rows()
    _, key = _build(tmp_path, _teacher_compute(teacher, x))
    cache = LogitCache(tmp_path / "cache", key)
    distill = DistillParams(features=[{"teacher": "net.convs.3", "student": "net.convs.3", "loss": hint_loss},
                                      {"teacher": "net.convs.5", "student": "net.convs.5", "weight": 0.5}])
    student = _cnn(4, seed=1)
    hints = features.plan(distill, cache.features, student, torch.zeros(2, 40))
    return features.HintedStudent(student, hints), cache, x


def test_projections_train_but_the_saved_student_does_not_carry_them(tmp_path):
    net, cache, x = _hinted_student(tmp_path)
    assert set(net.projections) == {"0", "1"}  # 4 -> 8 channels: a 1x1 conv and a linear map
    before = {k: v.clone() for k, v in net.projections.state_dict().items()}
    y = np.full(len(x), -1)
    fit(net, x.numpy(), y, lambda s, t, yb: torch.zeros(len(s)), FitConfig(1, 128, 0.01, 0.0, 0),
        extra=features.extra_loss(net, cache.take_feature))
    assert any(not torch.equal(before[k], v) for k, v in net.projections.state_dict().items())
    student = net.release()
    models.save(student, models.ModelSpec("cnn1d", {"channels": 4}, SCHEMA), tmp_path / "hinted")
    models.save(_cnn(4), models.ModelSpec("cnn1d", {"channels": 4}, SCHEMA), tmp_path / "plain")
    hinted, plain = (tmp_path / d / models.WEIGHTS_FILE for d in ("hinted", "plain"))
    assert set(load_file(str(hinted))) == set(load_file(str(plain)))
    assert hinted.stat().st_size == plain.stat().st_size
    assert not student.net.convs[3]._forward_hooks
    models.load(tmp_path / "hinted")  # loads as a plain student


def test_hint_loss_is_zero_when_the_student_is_the_teacher(tmp_path):
    teacher, x = _cnn(8).eval(), _rows()
    _, key = _build(tmp_path, _teacher_compute(teacher, x))
    cache = LogitCache(tmp_path / "cache", key)
    distill = DistillParams(features=[{"teacher": "net.convs.3", "student": "net.convs.3", "loss": "attention"},
                                      {"teacher": "net.convs.5", "student": "net.convs.5", "loss": "cosine"}])
    net = features.HintedStudent(teacher, features.plan(distill, cache.features, teacher, torch.zeros(2, 40)))
    assert len(net.projections) == 0
    idx = np.arange(10)
    with torch.no_grad():
        net(x[idx])
        per_row = features.extra_loss(net, cache.take_feature)(idx)
    torch.testing.assert_close(per_row, torch.zeros(10), atol=1e-6, rtol=0)


# --- errors before any compute --------------------------------------------------------------------

def _params(cache_features, hints=(), student=None):
    raw = {"cache": {"features": cache_features}, "distill": {"features": list(hints)}}
    if student:
        raw["student"] = student
    return parse_params(raw)


def test_unknown_teacher_module_lists_the_valid_names():
    p = _params([{"module": "net.conv.5"}])
    with pytest.raises(UserError, match=r"cache.features: no module 'net.conv.5'.*valid module names: .*net.convs.5"):
        features.check(p, _cnn(), SCHEMA)


def test_unknown_student_module_lists_the_valid_names():
    p = _params([{"module": "net.convs.5", "pool": "mean"}], [{"teacher": "net.convs.5", "student": "net.9"}])
    with pytest.raises(UserError, match=r"distill.features: no module 'net.9'.*net.0, net.1, net.2"):
        features.check(p, _cnn(), SCHEMA)


def test_unprojectable_shapes_are_refused_at_check_time():
    p = _params([{"module": "net.convs.5"}], [{"teacher": "net.convs.5", "student": "net.convs.1"}],
                student={"arch": "cnn1d", "options": {"channels": 4}})  # (4, 20) onto (8, 5)
    with pytest.raises(UserError, match=r"cannot project the student's \(4, 20\) feature onto the teacher's \(8, 5\)"):
        features.check(p, _cnn(), SCHEMA)


def test_check_passes_and_returns_the_teacher_shapes():
    p = _params([{"module": "net.convs.5", "pool": "max"}], [{"teacher": "net.convs.5", "student": "net.2"}])
    assert features.check(p, _cnn(), SCHEMA) == ((8,),)


@pytest.mark.parametrize("raw,needle", [
    ({"distill": {"features": [{"teacher": "net.convs.5", "student": "net.0"}]}}, "not in cache.features"),
    ({"cache": {"features": [{"module": "a"}, {"module": "a", "pool": "max"}]}}, "captured more than once"),
    ({"cache": {"features": [{"module": "a", "pool": "avg"}]}}, "cache.features.0.pool"),
    ({"cache": {"features": [{"module": "a"}]},
      "distill": {"features": [{"teacher": "a", "student": "b", "loss": "kl"}]}}, "distill.features.0.loss"),
])
def test_bad_feature_params_are_one_line_errors(raw, needle):
    with pytest.raises(UserError, match=needle):
        parse_params(raw)


# --- DistributedDataParallel: the projections are averaged over ranks like the student ------------

def _ddp_data():
    g = np.random.default_rng(0)
    x = g.normal(size=(400, 8)).astype(np.float32)
    return x, (x @ g.normal(size=(8, 3))).astype(np.float32), np.tanh(x @ g.normal(size=(8, 6))).astype(np.float32)


def _ddp_fit() -> features.HintedStudent:
    x, teacher, feats = _ddp_data()
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    net = features.HintedStudent(student, [features.Hint("t", "1", "mse", 1.0, "none", (16,), (6,))], l2=1e-3)
    y = np.full(len(x), -1)
    fit(net, x, y, lambda s, t, yb: hint_mse(s, t), FitConfig(2, 100, 0.01, 0.0, 3, device="cpu"),
        soft=lambda idx: teacher[idx], extra=features.extra_loss(net, lambda idx, _name: feats[idx]))
    return net


def _ddp_rank(rank: int, world: int, store: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    net = _ddp_fit()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
    torch.distributed.destroy_process_group()


def test_ddp_trains_hints_as_one_process_does(tmp_path):
    out = tmp_path / "rank0.safetensors"
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    ddp, single = load_file(str(out)), _ddp_fit().state_dict()
    assert any(k.startswith("projections.") for k in single)
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
