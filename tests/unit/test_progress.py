"""Progress callbacks: kd_core reports (done, total); the CLI draws rows/s and ETA only on a terminal."""

import io
import time

import numpy as np
import pytest
import torch
from rich.console import Console

from kd_core import progress
from kd_core.cache import CacheSettings, build_cache, cache_key
from kd_core.cli.progress_bars import progress_bars
from kd_core.train import FitConfig, fit


def test_fit_reports_rows_up_to_the_total():
    calls: list[tuple[int, int]] = []
    x, y = np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32), np.arange(100) % 3
    fit(torch.nn.Linear(4, 3), x, y, lambda s, _t, yb: torch.nn.functional.cross_entropy(s, yb, reduction="none"),
        FitConfig(epochs=2, batch_size=32, lr=0.01, weight_decay=0.0, seed=0, device="cpu"),
        progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (200, 200) and len(calls) == 8  # 4 batches x 2 epochs


def test_build_cache_reports_resumed_rows_first(tmp_path):
    logits = torch.randn(1000, 5)
    settings = CacheSettings("float32", 300)
    key = cache_key("t", "d", settings)
    args = (1000, 5, tmp_path / "out", tmp_path / "work", key, settings, {})
    calls: list[tuple[int, int]] = []

    def crash_on_third(a: int, b: int) -> torch.Tensor:
        if a >= 600:
            raise RuntimeError("killed")
        return logits[a:b]

    with pytest.raises(RuntimeError, match="killed"):  # the writer keeps the two shards done before
        build_cache(crash_on_third, *args)
    build_cache(lambda a, b: logits[a:b], *args, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (600, 1000) and calls[-1] == (1000, 1000)  # two shards resumed, two computed


def test_no_reporter_means_no_callback():
    assert progress.bar("anything") is None


def test_rich_bars_show_rows_per_second_and_eta_on_a_terminal():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with progress_bars(console) as reporter:
        assert reporter is not None
        bar = progress.bar("training student")  # what a stage asks for
        for done in range(0, 10_001, 2_000):
            bar(done, 10_000)
            time.sleep(0.01)
    text = buf.getvalue()
    assert "training student" in text and "rows/s" in text and "ETA" in text and "10000/10000" in text


def test_no_bars_when_output_is_captured():
    console = Console(file=io.StringIO(), force_terminal=False)
    with progress_bars(console) as reporter:
        assert reporter is None and progress.bar("x") is None
    assert console.file.getvalue() == ""
