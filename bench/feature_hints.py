"""Does distilling teacher features (hints) help? Logits-only vs logits + features, MLP and small-CNN students.

    .venv/bin/python bench/feature_hints.py [--transfer 50000] [--epochs 60] [--teacher-epochs 60] [--seeds 0]
                                            [--teacher artifacts/teacher]

MNIST-1D (the demo's built-in data, `data.seed: 42`), the demo teacher (CNN, 128 channels) trained once,
then for each row: `cache_logits` with that row's `cache.features` and `train_student` with its
`distill.features`, exactly as `kd stage` runs them (a temporary project directory; nothing else is
touched). Every student is scored on the 1000 test rows. `bytes/row` is the cache's `bytes_per_row`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from kd_core import data, evaluate, models
from kd_core.config import PARAMS_FILE, Params, parse_params
from kd_core.stages import cache_logits, prepare, teacher, train_student

MLP = {"arch": "mlp", "options": {"hidden": [256, 128]}}
CNN = {"arch": "cnn1d", "options": {"channels": 32}}  # the teacher's shape at a quarter of its width
ROWS = [  # (label, student, cache.features, distill.features)
    ("MLP 256-128, logits only", MLP, [], []),
    ("MLP 256-128, logits + features", MLP, [{"module": "net.convs.5", "pool": "mean"}],
     [{"teacher": "net.convs.5", "student": "net.3", "loss": "mse", "weight": 1.0}]),  # (128,) <- (128,)
    ("CNN 32 ch, logits only", CNN, [], []),
    ("CNN 32 ch, logits + features", CNN, [{"module": "net.convs.5", "pool": "none"}],
     [{"teacher": "net.convs.5", "student": "net.convs.5", "loss": "mse", "weight": 1.0}]),  # 1x1 conv 32 -> 128
    ("CNN 32 ch, logits + attention", CNN, [{"module": "net.convs.5", "pool": "none"}],  # the same cache
     [{"teacher": "net.convs.5", "student": "net.convs.5", "loss": "attention", "weight": 1.0}]),
]


def demo_params(overrides: dict) -> Params:
    """The project's params.yaml (the demo) with `overrides` merged in, section by section."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / PARAMS_FILE).read_text())
    for section, values in overrides.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    return parse_params(raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transfer", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--teacher-epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--teacher", help="a trained kd teacher directory to use instead of training one")
    args = ap.parse_args()
    base = {"data": {"transfer_size": args.transfer},
            "teacher": {"epochs": args.teacher_epochs, "source": str(Path(args.teacher).resolve()) if args.teacher
                        else "train"},
            "train": {"epochs": args.epochs, "device": "cpu"}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = demo_params(base)
        prepare.run(params, work)
        print(teacher.run(params, work).summary(), flush=True)
        splits = data.read_prepared(work / params.paths.prepared)
        x_test, y_test = data.features_array(splits.test, splits.schema), data.label_indices(splits.test, splits.schema)
        t_logits = models.predict_logits(models.load(work / params.paths.teacher)[0], x_test)
        print(f"teacher test accuracy {evaluate.accuracy(t_logits, y_test):.3f}")
        print("| student | distilled from | accuracy (test) | agreement with teacher | cache bytes/row | "
              "student size | seconds |")
        print("|---|---|---|---|---|---|---|")
        for label, student, captures, hints in ROWS:
            accs, agrees, t0 = [], [], time.perf_counter()
            for seed in args.seeds:
                p = demo_params({**base, "student": student, "cache": {"features": captures},
                                  "distill": {"features": hints}, "train": {**base["train"], "seed": seed}})
                cached = cache_logits.run(p, work).report
                train_student.run(p, work)
                model, _ = models.load(work / p.paths.student)
                logits = models.predict_logits(model, x_test)
                accs.append(evaluate.accuracy(logits, y_test))
                agrees.append(float((logits.argmax(1) == t_logits.argmax(1)).mean()))
            size = (work / p.paths.student / models.WEIGHTS_FILE).stat().st_size
            spread = f" ± {np.std(accs):.3f} ({', '.join(f'{a:.3f}' for a in accs)})" if len(accs) > 1 else ""
            hint = f"logits + {hints[0]['teacher']} ({hints[0]['loss']})" if hints else "logits"
            print(f"| {label} | {hint} | "
                  f"{np.mean(accs):.3f}{spread} | {np.mean(agrees):.3f} | {cached.bytes_per_row:,} | "
                  f"{size / 1024:.1f} KiB | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
