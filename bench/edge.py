"""What ships, measured with the pipeline itself: the int8 edge student and `distill.search`.

    .venv/bin/python bench/edge.py            # the demo + 4 held-out tables: ~20 min on 2 cores
    .venv/bin/python bench/edge.py --quick    # 10,000 transfer rows, fewer epochs: a smoke run

1. The demo (shipped params.yaml, distill.search on): `dvc repro export` in a temporary project, then
   `kd export --out` once per int8 mode on the same student: `dynamic` (ONNX Runtime's dynamic
   quantization, what export did before), `static` (calibrated QDQ, recipe chosen on training rows;
   the default) and `qad` (a quantization-aware fine-tune from the cache first). Every figure is
   against the fp32 student measured in the same export: size and batch-1 latency ratios, accuracy
   change, agreement, mean and max |Δlogit|. Targets: drop ≤ 0.5 pt, agreement ≥ 99 %, size ≤ 1/3,
   latency ≤ fp32 ONNX.
2. Held-out tables through the bring-your-own path (parquet, labels as strings): scikit-learn's
   bundled digits, breast cancer and wine tables and a noisy synthetic one (a quarter of the rows
   labelled, a quarter test, half unlabelled transfer rows). Each runs with distill.search off (the
   `distill` section's alpha 0.9, T 2) and on; the hard-label twin is the baseline stage. Targets: the
   searched student never below its twin; the int8 drop within 1 point.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from _project import BIN, ROOT, deep_update, env, new_project, set_params

QUICK = {"data": {"transfer_size": 10_000}, "teacher": {"epochs": 30}, "train": {"epochs": 20},
         "distill": {"search": {"epochs": 10}}}
NO_INT8_RULE = {"policy": {"max_int8_accuracy_drop": None}}  # measured here, not enforced


def run(proj: Path, *args: str) -> str:
    res = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=proj, env=env(proj), capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(args)} failed in {proj}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def read(proj: Path, rel: str) -> dict:
    return json.loads((proj / rel).read_text())


def int8_row(report: dict) -> dict[str, float]:
    s = report["student"]
    fp, q = s["onnx"], s["onnx_int8"]
    return {"accuracy": q["accuracy"], "change_pts": -100 * q["accuracy_drop"],
            "agreement": q["agreement_with_pytorch"], "size_ratio": q["size_bytes"] / fp["size_bytes"],
            "latency_ratio": q["latency_ms_p50"] / fp["latency_ms_p50"], "mean_abs": q["mean_abs_logit_diff"],
            "max_abs": q["max_abs_logit_diff"], "recipe": f"{report['int8']['method']}, "
                                                          f"{report['int8']['activations']}"}


def demo(tmp: Path, base: dict) -> dict[str, dict]:
    proj = new_project(tmp / "demo", deep_update(json.loads(json.dumps(base)), NO_INT8_RULE))
    print("demo: dvc repro export …", flush=True)
    run(proj, "dvc", "repro", "export")
    out = {"student": read(proj, "metrics/eval.json")["student"]["accuracy"],
           "setting": read(proj, "artifacts/student/search.json")["chosen"]}
    for mode in ("dynamic", "static", "qad"):
        print(f"demo: int8 {mode} …", flush=True)
        set_params(proj, {"export": {"int8": mode}})
        run(proj, "kd", "export", "--out", f"edge-{mode}")
        out[mode] = int8_row(read(proj, f"edge-{mode}/export.json"))
    return out


def tables() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn import datasets

    digits, cancer, wine = datasets.load_digits(), datasets.load_breast_cancer(), datasets.load_wine()
    x, y = datasets.make_classification(6000, n_features=20, n_informative=8, n_classes=4, flip_y=0.15,
                                        class_sep=0.6, random_state=0)
    return {"digits (64 features, 10 classes)": (digits.data, digits.target),
            "breast cancer (30, 2)": (cancer.data, cancer.target),
            "wine (13, 3; 178 rows)": (wine.data, wine.target),
            "noisy synthetic (20, 4)": (x, y)}


def byo(tmp: Path, base: dict, name: str, x: np.ndarray, y: np.ndarray) -> dict:
    """One table: train/test/transfer parquet files, string labels; search off then on."""
    order = np.random.default_rng(0).permutation(len(x))
    cols = [f"c{i}" for i in range(x.shape[1])]
    frame = pd.DataFrame(x[order].astype(np.float32), columns=cols).assign(label=[f"class_{v}" for v in y[order]])
    n = len(frame) // 4
    params = deep_update(json.loads(json.dumps(base)), {**NO_INT8_RULE, "data": {
        "source": "parquet", "train": "data/raw/train.parquet", "test": "data/raw/test.parquet",
        "transfer": "data/raw/transfer.parquet", "label_column": "label"}})
    search = params["distill"]["search"]
    proj = new_project(tmp / name.split()[0], deep_update(params, {"distill": {"search": None}}))
    frame[:n].to_parquet(proj / "data/raw/train.parquet")
    frame[n:2 * n].to_parquet(proj / "data/raw/test.parquet")
    frame[2 * n:].drop(columns="label").to_parquet(proj / "data/raw/transfer.parquet")
    print(f"{name}: search off …", flush=True)
    run(proj, "dvc", "repro", "export")
    off = read(proj, "metrics/eval.json")
    print(f"{name}: search on …", flush=True)
    set_params(proj, {"distill": {"search": search}})
    run(proj, "dvc", "repro", "export")
    on = read(proj, "metrics/eval.json")
    return {"rows": len(frame), "teacher": on["teacher"]["accuracy"], "twin": on["baseline"]["accuracy"],
            "default": off["student"]["accuracy"], "search": on["student"]["accuracy"],
            "chosen": read(proj, "artifacts/student/search.json")["chosen"],
            "int8": int8_row(read(proj, "metrics/export.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller demo (not the README's figures)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    if args.quick:
        base = deep_update(base, QUICK)
    with tempfile.TemporaryDirectory(prefix="kd-edge-") as tmp:
        results = {"demo": demo(Path(tmp), base),
                   "tables": {name: byo(Path(tmp), base, name, x, y) for name, (x, y) in tables().items()}}
    d = results["demo"]
    print(f"\ndemo student {d['student']:.3f} ({d['setting']}); int8 against the fp32 student of the same export:")
    print("mode | recipe | accuracy | change | agreement | size / fp32 | latency / fp32 ONNX | mean |Δ| | max |Δ|")
    for mode in ("dynamic", "static", "qad"):
        r = d[mode]
        print(f"{mode} | {r['recipe']} | {r['accuracy']:.3f} | {r['change_pts']:+.1f} pts | {r['agreement']:.3f} | "
              f"{r['size_ratio']:.2f} | {r['latency_ratio']:.2f} | {r['mean_abs']:.3f} | {r['max_abs']:.2f}")
    print("\nheld-out tables | rows | teacher | twin | student (alpha 0.9, T 2) | student (search) | chosen | "
          "int8 change | int8 agreement")
    for name, t in results["tables"].items():
        print(f"{name} | {t['rows']} | {t['teacher']:.3f} | {t['twin']:.3f} | {t['default']:.3f} | "
              f"{t['search']:.3f} | {t['chosen']} | {t['int8']['change_pts']:+.1f} pts | {t['int8']['agreement']:.3f}")
    print("\ntargets: int8 change >= -0.5 pt, agreement >= 0.99, size <= 0.33, latency <= 1.0 (demo); "
          "searched student >= twin, int8 change >= -1 pt (tables)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
