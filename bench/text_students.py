"""The text example's targets, measured: both kinds of student against the fine-tuned teacher and their
hard-label twins, with and without hidden-state hints.

    .venv/bin/python bench/text_students.py [--teacher DIR] [--epochs 12] [--transfer 8000] [--seeds 0 1]

examples/text/params.yaml (fortunes, MiniLM fine-tuned as the teacher) in a temporary project: `prepare`,
`teacher` (or `--teacher`, a kd text model directory trained before, e.g. artifacts/teacher of a text
run) and one `cache_logits` capturing the teacher's last hidden state (mean over real tokens); then per row
`train_student`, `train_baseline` (once per architecture) and `evaluate`, exactly as `kd stage` runs them.
Every figure is from eval.json of the same process, so the latency ratio compares models timed together.

Targets (issue 14): student (b) `narrow` ≤ 1/5 of the teacher's parameters, ≥ 3× lower batch-1 latency,
≥ 95 % of the teacher's accuracy and ≥ 5 points over its twin; student (a) with half the layers ≥ 98 %.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from kd_core.config import PARAMS_FILE, Params, parse_params
from kd_core.stages import cache_logits, evaluate, prepare, teacher, train_baseline, train_student

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "text" / PARAMS_FILE
TEACHER_HIDDEN = "net.bert.encoder.layer.5.output"  # MiniLM's last layer: (B, L, 384)
NARROW = {"arch": "narrow", "options": {"hidden": 128, "layers": 2, "heads": 2, "intermediate": 512}}
HALF = {"arch": "layers", "options": {"layers": [0, 2, 4]}}  # DistilBERT's every-other-layer init, 3 of 6
FINE_TUNE = {"lr": 1e-4}  # pretrained layers: a fine-tuning learning rate (the example's 1e-3 is for `narrow`)
ROWS = [  # (label, student, distill.features, train)
    ("(b) narrow 128×2", NARROW, [], {}),
    ("(b) narrow 128×2 + hint", NARROW,
     [{"teacher": TEACHER_HIDDEN, "student": "net.bert.encoder.layer.1.output", "loss": "cosine", "weight": 1.0}], {}),
    ("(a) layers [0, 2, 4]", HALF, [], FINE_TUNE),
    ("(a) layers [0, 2, 4] + hint", HALF,
     [{"teacher": TEACHER_HIDDEN, "student": "net.bert.encoder.layer.2.output", "loss": "cosine", "weight": 1.0}],
     FINE_TUNE),
]


def example_params(overrides: dict) -> Params:
    """examples/text/params.yaml with `overrides` merged in, section by section."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    for section, values in overrides.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    return parse_params(raw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", help="a fine-tuned kd text model directory to use instead of fine-tuning one")
    ap.add_argument("--epochs", type=int, help="exactly this many student epochs (default: the example's)")
    ap.add_argument("--transfer", type=int, help="unlabelled documents (default: the example's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rows", type=int, nargs="+", help="which rows of ROWS to run (0-based; default: all)")
    args = ap.parse_args()
    train = {"device": "cpu", **({"epochs": args.epochs, "min_steps": None} if args.epochs else {})}
    base = {"cache": {"features": [{"module": TEACHER_HIDDEN, "pool": "mean"}]}, "train": train,
            "data": {"transfer_size": args.transfer} if args.transfer else {}}
    if args.teacher:
        base["teacher"] = {"source": str(Path(args.teacher).resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = example_params(base)
        prepare.run(params, work)
        t0 = time.perf_counter()
        print(teacher.run(params, work).summary(), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        print(cache_logits.run(params, work).summary(), flush=True)
        print("| student | params (× teacher) | batch-1 latency (teacher ÷ student) | accuracy | "
              "kept of teacher | hard-label twin | gain (pts) | agreement | seconds |")
        print("|---|---|---|---|---|---|---|---|---|")
        twins: dict[tuple, float] = {}
        for label, student, hints, student_train in [ROWS[i] for i in (args.rows or range(len(ROWS)))]:
            accs, twin_accs, t0 = [], [], time.perf_counter()
            for seed in args.seeds:
                p = example_params({**base, "student": student, "distill": {"features": hints},
                                    "train": {**train, **student_train, "seed": seed}})
                train_student.run(p, work)
                key = (student["arch"], str(student["options"]), str(student_train), seed)
                if key not in twins:
                    train_baseline.run(p, work)
                ev = evaluate.run(p, work).metrics
                twins.setdefault(key, ev["baseline"]["accuracy"])
                accs.append(ev["student"]["accuracy"])
                twin_accs.append(twins[key])
            t, s = ev["teacher"], ev["student"]
            acc, twin = float(np.mean(accs)), float(np.mean(twin_accs))
            spread = f" ± {np.std(accs):.3f}" if len(accs) > 1 else ""
            print(f"| {label} | {s['params']:,} ({s['params'] / t['params']:.2f}) | "
                  f"{t['latency_ms_p50'] / s['latency_ms_p50']:.1f}× | {acc:.3f}{spread} | "
                  f"{acc / t['accuracy']:.1%} | {twin:.3f} | {(acc - twin) * 100:+.1f} | "
                  f"{s['agreement_with_teacher']:.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
        print(f"teacher: accuracy {t['accuracy']:.3f}, {t['params']:,} parameters, "
              f"batch-1 latency {t['latency_ms_p50']:.2f} ms, at the median document length")


if __name__ == "__main__":
    main()
