"""Every shipped example end to end, as a user runs it: the README's results table.

    .venv/bin/python bench/examples.py                  # mnist1d, text, lm, image: ~60 min on 2 idle cores
    .venv/bin/python bench/examples.py text lm          # some of them
    .venv/bin/python bench/examples.py --json out.json  # also the figures as JSON

Each example's `examples/<name>/params.yaml` becomes the params.yaml of a temporary copy of the
project (a fresh git repository, its own MLflow store), and `dvc repro` runs the whole DAG there,
exactly as `make <example>` does minus Prefect. The table shows, per example: the teacher, student and
twin (the baseline: the student's architecture on labels alone) on the headline metric, the student's
retention of the teacher and its gain over the twin, the setting `distill.search` kept and how it was
scored, the int8 file's change against the fp32 student and the policy's verdict on it, the GGUF files
of a task that has a GGUF export (`kd export --gguf`: size, max |Δlogit|, perplexity per format), the DAG's
exit code, whether a model card came out, and the wall time of every stage.
Run it before resolving anything that touches a task, training, the search, the cache or export.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from _project import BIN, ROOT, env, new_project

EXAMPLES = ("mnist1d", "text", "lm", "image")
STAGE_LINE = "Running stage '"  # how `dvc repro` announces a stage


def repro(proj: Path, log: Path) -> tuple[int, dict[str, float], float]:
    """`dvc repro` in `proj`: exit code, wall seconds per stage (from its announcements), total."""
    times: dict[str, float] = {}
    start = last = time.perf_counter()
    current = None
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=proj, env=env(proj) | {"PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            out.flush()  # the log is how one follows a 15-minute example
            if line.startswith(STAGE_LINE):
                now = time.perf_counter()
                if current is not None:
                    times[current] = now - last
                current, last = line[len(STAGE_LINE):].split("'")[0], now
        code = proc.wait()
    end = time.perf_counter()
    if current is not None:
        times[current] = end - last
    return code, times, end - start


def _read(proj: Path, rel: str) -> dict | None:
    path = proj / rel
    return json.loads(path.read_text()) if path.is_file() else None


def figures(proj: Path) -> dict:
    """The headline figures of a finished (or failed) run, from the files the DAG wrote."""
    ev, ex = _read(proj, "metrics/eval.json"), _read(proj, "metrics/export.json")
    search = _read(proj, "artifacts/student/search.json")
    out: dict = {"card": (proj / "reports/model_card.md").is_file()}
    if search:
        out["setting"] = search["chosen"]
        out["scored_by"] = search.get("scored_by", "validation rows")
    if ev:
        metric = "perplexity" if "perplexity" in ev["student"] else "accuracy"
        t, s, b = (ev[k][metric] for k in ("teacher", "student", "baseline"))
        out |= {"metric": metric, "teacher": t, "student": s, "twin": b,
                "macs": ev["student"]["macs"] / max(ev["teacher"]["macs"], 1)}
        if metric == "perplexity":  # lower is better: retention is teacher / student, gain a ratio to the twin
            out |= {"retention": t / s, "vs_twin": s / b}
        else:
            out |= {"retention": s / t, "vs_twin": s - b}
    if ex:
        q, fp = ex["student"]["onnx_int8"], ex["student"]["pytorch"]
        out["int8_decision"] = ex.get("int8_policy", {}).get("decision", "?")
        r = ex["int8"]
        out["int8_recipe"] = r["method"] + (", edge layers in float" if r["kept_float"] else "") + (
            f", {r['activations']} activations" if r["activations"] != "dynamic" else "")
        if "perplexity" in q:
            out["int8_change"] = q["perplexity"] / fp["perplexity"] - 1
        else:
            out["int8_change"] = -q["accuracy_drop"]
    return out


def gguf(proj: Path, task: str, log: Path) -> dict | None:
    """`kd export --gguf` where the example's task has a GGUF export: per format the file's size, max
    |Δlogit| and perplexity against the PyTorch student (its gguf.json); None where the task has none."""
    if not (proj / "kd_core" / "tasks" / task / "gguf.py").is_file():
        return None
    with log.open("a") as out:
        done = subprocess.run([str(BIN / "kd"), "export", "--gguf"], cwd=proj, env=env(proj), stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    report = _read(proj, "artifacts/gguf/gguf.json")
    return report if done.returncode == 0 and report else {"failed": done.returncode}


def run_example(name: str, tmp: Path, logs: Path) -> dict:
    params = yaml.safe_load((ROOT / "examples" / name / "params.yaml").read_text())
    proj = new_project(tmp / name, params)
    print(f"{name}: dvc repro in {proj} …", flush=True)
    code, stages, total = repro(proj, logs / f"{name}.log")
    result = {"exit": code, "stages": stages, "seconds": total, **figures(proj)}
    if code == 0:
        result["gguf"] = gguf(proj, params.get("task", ""), logs / f"{name}.log")
    print(f"{name}: exit {code} in {total / 60:.1f} min", flush=True)
    return result


def _fmt(r: dict) -> list[str]:
    if "student" not in r:
        return ["–"] * 5
    if r["metric"] == "perplexity":
        heads = [f"{r[k]:.1f}" for k in ("teacher", "student", "twin")]
        return [*heads, f"{r['retention']:.3f}", f"×{r['vs_twin']:.2f} of the twin's perplexity"]
    heads = [f"{r[k]:.3f}" for k in ("teacher", "student", "twin")]
    return [*heads, f"{r['retention']:.3f}", f"{100 * r['vs_twin']:+.1f} pts"]


def _gguf_cell(report: dict | None) -> str:
    if not report:
        return "–"
    if "failed" in report:
        return f"FAILED (exit {report['failed']})"
    return "; ".join(f"{fmt} {r['size_bytes'] / 2**20:.0f} MiB, max \\|Δlogit\\| {r['max_abs_logit_diff']:.2g}, "
                     f"ppl {r['perplexity']:.1f} (PyTorch {r['pytorch_perplexity']:.1f})" for fmt, r in report.items())


def table(results: dict[str, dict]) -> str:
    head = ["example", "metric", "teacher", "student", "twin", "retention", "gain over twin", "MACs / teacher",
            "search kept",
            "int8 change (verdict)", "GGUF", "exit", "card", "wall per stage (s)", "total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        if "int8_change" in r:
            unit = f"{100 * r['int8_change']:+.1f} % perplexity" if r.get("metric") == "perplexity" \
                else f"{100 * r['int8_change'] + 0.0:+.1f} pts"
            int8 = f"{unit} ({r['int8_decision']}; {r['int8_recipe']})"
        else:
            int8 = "–"
        kept = f"{r['setting']} ({r['scored_by']})" if "setting" in r else "search off"
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
        macs = f"1/{1 / r['macs']:.0f}" if r.get("macs") else "–"
        cells = [name, r.get("metric", "–"), *_fmt(r), macs, kept, int8, _gguf_cell(r.get("gguf")), str(r["exit"]),
                 "yes" if r["card"] else "NO",
                 stages, f"{r['seconds'] / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("examples", nargs="*", default=list(EXAMPLES), metavar="EXAMPLE",
                    help=f"which to run (default: all of {', '.join(EXAMPLES)})")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects (their path is printed)")
    args = ap.parse_args()
    if unknown := set(args.examples) - set(EXAMPLES):
        ap.error(f"unknown example(s) {sorted(unknown)}; choose from {', '.join(EXAMPLES)}")
    tmp = Path(tempfile.mkdtemp(prefix="kd-examples-"))
    logs = tmp / "logs"
    logs.mkdir()
    results = {name: run_example(name, tmp, logs) for name in args.examples}
    when = datetime.date.today().isoformat()
    print(f"\n{when}, {os.cpu_count()} CPU cores ({platform.machine()}), no GPU used; dvc repro logs in {logs}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"date": when, "results": results}, indent=2) + "\n")
    if not args.keep:
        subprocess.run(["rm", "-rf", *(str(tmp / n) for n in args.examples)], check=False)
    if any(r["exit"] != 0 or not r["card"] or "failed" in (r.get("gguf") or {}) for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
