"""Demo quality of each distillation variant, measured with the pipeline itself (`dvc repro evaluate`).

    .venv/bin/python bench/quality.py            # the demo config (params.yaml): ~15 min on 2 cores
    .venv/bin/python bench/quality.py --quick    # 10,000 transfer rows, fewer epochs: a smoke run

Runs in a temporary copy of the project (git + DVC), one variant after another; DVC re-runs only
what a variant changes (DKD re-trains the student alone; a top-k cache re-caches; several teachers
train and cache each member). Prints, per variant, test accuracy of teacher / student / hard-label
baseline and the targets of issue 4: student ≥ 0.95× teacher accuracy with ≤ 1/10 of its MACs, and
≥ 15 points over the baseline. The baseline is trained once and is the same control for every row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import yaml
from _project import BIN, ROOT, deep_update, env, new_project

QUICK = {"data": {"transfer_size": 10_000}, "teacher": {"epochs": 30}, "train": {"epochs": 20}}


def run_variant(proj: Path, base: dict, change: dict) -> dict:
    params = deep_update(json.loads(json.dumps(base)), change)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = subprocess.run([str(BIN / "dvc"), "repro", "evaluate"], cwd=proj, env=env(proj), capture_output=True,
                         text=True)
    if res.returncode:
        raise SystemExit(f"dvc repro failed for {change}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    ev = json.loads((proj / "metrics/eval.json").read_text())
    logits = proj / "artifacts/logits"
    dirs = sorted(logits.iterdir()) if "teachers" in change else [logits]  # one cache per teacher
    n_rows = json.loads((dirs[0] / "manifest.json").read_text())["rows"]
    cache_bytes = sum(f.stat().st_size for d in dirs for f in d.glob("*.npy"))
    return {**ev, "cache_bytes_per_row": cache_bytes / n_rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows and epochs (not the demo's figures)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    if args.quick:
        base = deep_update(base, QUICK)
    variants: dict[str, dict] = {
        "KD (Hinton, dense cache)": {},
        "DKD": {"distill": {"loss": "dkd"}},
        "KD, top-5 cache": {"cache": {"top_k": 5}},
        # the base teacher's recipe twice: member i is seeded train.seed + i
        "KD, 2-teacher ensemble": {"teachers": [base["teacher"], base["teacher"]]},
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="kd-quality-") as tmp:
        proj = Path(tmp)
        new_project(proj, base)
        for name, change in variants.items():
            print(f"running {name} …", flush=True)
            results[name] = run_variant(proj, base, change)
    baseline = results["KD (Hinton, dense cache)"]["baseline"]
    print(f"\nhard-label baseline ({base['student']['arch']} {base['student'].get('options', {})}): "
          f"accuracy {baseline['accuracy']:.3f}, {baseline['macs']:,} MACs\n")
    head = ("variant", "teacher acc", "student acc", "student/teacher", "gain vs baseline", "teacher/student MACs",
            "cache B/row")
    print(" | ".join(head))
    for name, r in results.items():
        te, st = r["teacher"], r["student"]
        ratio = st["accuracy"] / te["accuracy"]
        print(" | ".join([name, f"{te['accuracy']:.3f}", f"{st['accuracy']:.3f}", f"{ratio:.3f}",
                          f"{100 * (st['accuracy'] - r['baseline']['accuracy']):+.1f} pts",
                          f"{te['macs'] / st['macs']:.1f}", f"{r['cache_bytes_per_row']:.0f}"]))
        for i, m in enumerate(r.get("teachers", [])):
            print(f"    teachers.{i} ({m['arch']}): accuracy {m['accuracy']:.3f}")
    print("\ntargets: student/teacher >= 0.95 (aim 0.97), teacher/student MACs >= 10, gain >= +15 pts")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
