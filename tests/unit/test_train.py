"""The training loop: seeds, checkpoints and resume, early stopping, DDP's share of a batch."""

import os
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from kd_core import losses, train
from kd_core.errors import UserError
from kd_core.stages._common import validation_rows
from kd_core.train import FitConfig, best_epoch, checkpoint_epochs, fit, should_stop

N, F_, K = 600, 8, 3


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, labels (the last half unlabelled) and a fixed random teacher's logits.  # (N, F), (N,), (N, K)"""
    g = np.random.default_rng(seed)
    x = g.normal(size=(N, F_)).astype(np.float32)
    teacher = x @ g.normal(size=(F_, K)).astype(np.float32)  # (N, K)
    y = teacher.argmax(1).astype(np.int64)
    y[N // 2:] = losses.UNLABELLED
    return x, y, teacher


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(F_, 16), nn.ReLU(), nn.Linear(16, K))


def _fit(model: nn.Module, cfg: FitConfig, **kw) -> list[dict[str, float]]:
    x, y, teacher = _data()
    loss = lambda s, t, yb: losses.hinton_kd(s, t, yb, 2.0, 0.5)  # noqa: E731
    return fit(model, x, y, loss, cfg, soft=lambda idx: teacher[idx], **kw)


CFG = FitConfig(epochs=6, batch_size=64, lr=0.01, weight_decay=1e-4, seed=3, device="cpu")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_seeded_cpu_run_repeats_exactly():
    a, b = _model(), _model()
    ha, hb = _fit(a, CFG), _fit(b, CFG)
    assert _same_weights(a, b)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]


def test_a_crashed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    clean = _model()
    _fit(clean, CFG, val=np.arange(0, 60))

    class Crash(Exception):
        pass

    def crash_at_3(row: dict[str, float]) -> None:
        if row["epoch"] == 3:
            raise Crash

    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(Crash):
        _fit(_model(), CFG, val=np.arange(0, 60), checkpoint=ckpt, on_epoch=crash_at_3)
    assert checkpoint_epochs(ckpt) == 3
    seen: list[float] = []
    resumed = _model()
    history = _fit(resumed, CFG, val=np.arange(0, 60), checkpoint=ckpt, on_epoch=lambda r: seen.append(r["epoch"]))
    assert seen == [4.0, 5.0, 6.0] and len(history) == 6  # epochs 1-3 came from the checkpoint
    assert _same_weights(clean, resumed)


def test_an_unreadable_checkpoint_means_training_from_the_start(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = _fit(_model(), CFG, checkpoint=ckpt)
    assert len(history) == CFG.epochs and any("unreadable checkpoint" in str(w.message) for w in caught)


def test_early_stopping_stops_after_patience_and_keeps_the_best_epochs_weights():
    """Validation labels that are noise cannot keep improving: training must stop `patience` epochs
    after the best one (not run all 40) and keep that epoch's weights."""
    x, y, _ = _data()
    val = np.arange(0, 100)
    y_noise = y.copy()
    y_noise[val] = np.random.default_rng(1).integers(0, K, len(val))  # unlearnable from the training rows
    cfg = FitConfig(epochs=40, batch_size=64, lr=0.05, weight_decay=0.0, seed=0, device="cpu", patience=3)
    model = _model()
    history = fit(model, x, y_noise, lambda s, _t, yb: losses.hard_ce(s, yb), cfg, val=val)
    best = best_epoch(history)
    with torch.no_grad():
        acc = (model(torch.from_numpy(x[val])).argmax(1).numpy() == y_noise[val]).mean()
    assert acc == pytest.approx(history[best - 1]["val_accuracy"])
    assert len(history) < cfg.epochs and history[-1]["epoch"] - best == 3


def test_validation_rows_are_never_trained_on():
    """A teacher that lies on the validation rows: the student's validation accuracy shows it never saw them."""
    x, y, teacher = _data()
    val = np.arange(0, 150)
    y_lie = y.copy()
    y_lie[val] = (y[val] + 1) % K  # were these rows trained on, the model would learn the wrong classes
    cfg = FitConfig(epochs=15, batch_size=64, lr=0.01, weight_decay=0.0, seed=0, device="cpu")
    history = fit(_model(), x, y_lie, lambda s, _t, yb: losses.hard_ce(s, yb), cfg, val=val)
    assert history[-1]["val_accuracy"] < 0.2  # scored against the lying labels: the model predicts the truth


def test_best_epoch_and_patience():
    h = [{"epoch": float(e), "val_accuracy": a} for e, a in enumerate([0.5, 0.7, 0.7, 0.6, 0.65], start=1)]
    assert best_epoch(h) == 3  # the latest of equals
    assert not should_stop(h, 3) and should_stop(h, 2) and not should_stop(h, None)
    assert best_epoch([{"epoch": 1.0}, {"epoch": 2.0}]) == 2  # no validation: the last epoch


def test_validation_rows_are_seeded_and_a_fraction():
    a, b = validation_rows(4000, 0.1, 0), validation_rows(4000, 0.1, 0)
    assert np.array_equal(a, b) and len(a) == 400 and len(np.unique(a)) == 400 and a.max() < 4000
    assert not np.array_equal(a, validation_rows(4000, 0.1, 1)) and len(validation_rows(4000, 0.0, 0)) == 0


def test_a_loss_that_averages_is_refused():
    with pytest.raises(UserError, match="one value per row"):
        x, y, _ = _data()
        fit(_model(), x, y, lambda s, _t, yb: losses.hard_ce(s, yb).mean(), CFG)


def test_a_top_k_cache_trains_from_its_top_k_as_the_dense_cache_would(tmp_path, monkeypatch):
    """`fit` reads a top-k cache as top-k (`targets`: values, indices, tail), never its dense (B, C) view;
    with a one-class tail the bucketed KL is the exact KL, so training matches the dense cache's."""
    from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key
    from kd_core.config import DistillParams

    x, y, teacher = _data()
    settings = CacheSettings("float32", 128, K - 1)  # top-(K-1): the tail is one class
    key = cache_key("t", "d", settings)
    build_cache(lambda a, b: torch.from_numpy(teacher[a:b]), N, K, tmp_path / "c", tmp_path / "w", key, settings, {})
    cache = LogitCache(tmp_path / "c", key)
    monkeypatch.setattr(LogitCache, "take", lambda *_: pytest.fail("the dense view of a top-k cache was read"))
    distill = DistillParams(temperature=2.0, alpha=0.5)
    topk, dense = _model(), _model()
    h_topk = fit(topk, x, y, losses.build(distill, cache.top_k), CFG, soft=cache.targets, val=np.arange(0, 60))
    h_dense = _fit(dense, CFG, val=np.arange(0, 60))
    for a, b in zip(h_topk, h_dense, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["agreement_with_teacher"] == b["agreement_with_teacher"]
        assert a["val_agreement_with_teacher"] == b["val_agreement_with_teacher"]
    for p, q in zip(topk.parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def _rank(rank: int, world: int, store: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = _model()
    # batch 100 over 540 training rows: 3 ranks split each batch 34/33/33 and the last one (40 rows) 14/13/13
    cfg = FitConfig(epochs=3, batch_size=100, lr=0.01, weight_decay=1e-4, seed=3, device="cpu")
    history = _fit(model, cfg, val=np.arange(0, 60))
    if rank == 0:
        save_file({**model.state_dict(), "loss": torch.tensor([h["loss"] for h in history])}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_follow_the_single_process_run(tmp_path, world):
    """Each rank's share is weighted by its rows, so N ranks make the updates one process makes."""
    out = tmp_path / "rank0.safetensors"
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), str(out)), nprocs=world)
    ddp = load_file(out)
    single = _model()
    history = _fit(single, FitConfig(epochs=3, batch_size=100, lr=0.01, weight_decay=1e-4, seed=3, device="cpu"),
                   val=np.arange(0, 60))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
    assert ddp["loss"].tolist() == pytest.approx([h["loss"] for h in history], rel=1e-5)


def test_length_bucketed_batches_keep_every_row_once_and_group_similar_lengths() -> None:
    """Text batches cost their longest row: grouping by length must not drop, repeat or fix the order of rows."""
    rng = np.random.default_rng(0)
    lengths, order = rng.integers(1, 128, 1000), rng.permutation(1000)
    out = train.bucketed(order, lengths, 64, np.random.default_rng(1))
    assert sorted(out.tolist()) == list(range(1000))
    spread = [np.ptp(lengths[out[i:i + 64]]) for i in range(0, 960, 64)]  # full batches
    assert max(spread) < 20 < np.ptp(lengths)  # a random batch would span ~the whole range
    again = train.bucketed(order, lengths, 64, np.random.default_rng(1))
    np.testing.assert_array_equal(out, again)  # seeded: a resumed run draws the same batches
    assert not np.array_equal(out, train.bucketed(order, lengths, 64, np.random.default_rng(2)))


def test_min_steps_raises_epochs_on_small_data_only() -> None:
    """A recipe tuned on thousands of rows must still make enough updates on a hundred (train/teacher.min_steps)."""
    from kd_core.stages._common import epochs_for

    assert epochs_for(5, None, 120, 32) == 5
    assert epochs_for(5, 100, 640, 32) == 5  # 20 steps per epoch: 100 already
    assert epochs_for(5, 100, 120, 32) == 25  # 4 steps per epoch
    assert epochs_for(5, 100, 0, 32) == 100  # no rows: one (empty) step per epoch, never a division by zero


def test_a_step_budget_ends_mid_epoch_and_labels_alone_get_the_students_steps() -> None:
    """distill.search's fairness: the same optimizer steps whatever the rows a setting trains on."""
    from kd_core.config import TrainParams
    from kd_core.stages._common import fit_config, labels_only_config

    calls = []
    model = _model()
    model.register_forward_hook(lambda *_: calls.append(1))
    cfg = FitConfig(epochs=99, batch_size=64, lr=1e-2, weight_decay=0.0, seed=0, steps=23)
    history = _fit(model, cfg)  # 600 rows: 10 batches an epoch, so 2 whole passes and 3 batches
    assert len(calls) == 23 and len(history) == 3 and train.budget(cfg, N) == (23, 3)

    tp = TrainParams(epochs=5, batch_size=64, min_steps=None, patience=None)
    student = fit_config(tp, 9000 - 60)  # all rows but the validation ones
    twin = labels_only_config(tp, 9000, 600, 60)  # the 540 labelled rows trained on
    assert train.budget(twin, 540)[0] == train.budget(student, 9000 - 60)[0] == 140 * 5
