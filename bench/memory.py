"""Memory that does not grow with the data: each stage's own peak RSS at 1x, 4x and 16x its data.

    .venv/bin/python bench/memory.py                          # test 256 -> 4,096 tokens; corpus 1x vs 16x: ~1 h
    .venv/bin/python bench/memory.py --test-tokens 4096       # the lm example's own test split at 1x (16x: 65,536)
    .venv/bin/python bench/memory.py --json out.json          # also the figures as JSON
    .venv/bin/python bench/memory.py --project DIR --scales 16 --skip-corpus   # again in a kept project (--keep)

The lm example (examples/lm/params.yaml: SmolLM2-135M teacher, vocabulary 49,152, 128-token sequences) in a
temporary copy of the project, with what only costs time shrunk to fit 2 CPU cores: the student keeps 2 of
the teacher's 30 layers, one epoch over `--train-tokens`, no setting search, int8 calibrated and chosen on
2 sequences each. The shapes that size every logit array — vocabulary, sequence length — are the example's.

Each stage runs as `kd stage NAME` in its own process, and its peak resident set (the kernel's ru_maxrss of
that process, from wait4) is the figure: imports and model weights included, as a user's machine sees it.
- `evaluate` and `export` on the test split scaled 1x, 4x, 16x (`data.max_test_tokens`; the same models).
- `prepare` and `cache_logits` on a corpus 16x larger than at 1x: the standard library's docstring documents
  (the example's corpus) as text files, 16 copies of each at 16x, with `data.max_tokens` scaled alike, so
  the teacher caches 16x the tokens (`--cache-tokens` at 1x).
Target: every 16x run within 1.2x of its 1x run's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from _project import BIN, ROOT, deep_update, env, new_project, set_params

TARGET = 1.2  # the 16x run's peak at most this multiple of the 1x run's
SCALES = (1, 4, 16)
SEQ = 128  # the lm example's data.seq_len


def bench_params(train_tokens: int, test_tokens: int) -> dict:
    """The lm example with its time costs cut and its shapes kept."""
    params = yaml.safe_load((ROOT / "examples" / "lm" / "params.yaml").read_text())
    return deep_update(params, {"data": {"max_tokens": train_tokens, "max_test_tokens": test_tokens},
                                "student": {"options": {"layers": [0, 29]}}, "distill": {"search": None},
                                "train": {"epochs": 1}, "export": {"calibration_rows": 2, "selection_rows": 2}})


def peak_mib(proj: Path, stage: str, log: Path) -> tuple[float, float]:
    """`kd stage STAGE` in `proj`: its own peak RSS (MiB) and wall seconds; a failed stage stops the bench."""
    with log.open("a") as out:
        out.write(f"\n=== kd stage {stage}\n")
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "kd"), "stage", stage], cwd=proj, env=env(proj), stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"kd stage {stage} failed in {proj} (exit {proc.returncode}); see {log}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # Linux: ru_maxrss in KiB


def write_corpus(docs: list[tuple[str, str]], test: list[tuple[str, str]], copies: int, dest: Path) -> None:
    """train/ and test/ folders of .txt documents: every document `copies` times, under distinct names."""
    for split, items in (("train", docs), ("test", test)):
        for c in range(copies):
            folder = dest / split / f"copy{c}"
            folder.mkdir(parents=True)
            for name, text in items:
                (folder / f"{name}.txt").write_text(text, encoding="utf-8")


def corpus_runs(main: Path, tmp: Path, cache_tokens: int, test_tokens: int, log: Path) -> dict[str, dict]:
    """prepare and cache_logits at 1x and 16x the corpus, with the teacher the main project adopted."""
    from kd_core.config import load_params
    from kd_core.tasks.lm.data import read_documents

    params = yaml.safe_load((main / "params.yaml").read_text())
    train, test = read_documents(load_params(main).data, main)  # the example's split of its stdlib documents
    out: dict[str, dict] = {"prepare": {}, "cache_logits": {}}
    for scale in (1, 16):
        proj = new_project(tmp / f"corpus{scale}", params)
        write_corpus(train, test, scale, proj / "data" / "raw" / "corpus")
        set_params(proj, {"data": {"source": "text", "train": "data/raw/corpus/train", "test": "data/raw/corpus/test",
                                   "max_tokens": cache_tokens * scale, "max_test_tokens": test_tokens}})
        shutil.copytree(main / params["paths"]["teacher"], proj / params["paths"]["teacher"])
        for stage in ("prepare", "cache_logits"):
            out[stage][scale] = peak_mib(proj, stage, log)
            print(f"{stage} at {scale}x the corpus: {out[stage][scale][0]:.0f} MiB", flush=True)
        shutil.rmtree(proj)
    return out


def test_runs(main: Path, base: int, scales: list[int], log: Path) -> dict[str, dict]:
    """evaluate and export of the same models on the test split at each scale."""
    out: dict[str, dict] = {"evaluate": {}, "export": {}}
    for scale in scales:
        set_params(main, {"data": {"max_test_tokens": base * scale}})
        peak_mib(main, "prepare", log)  # the same train split; a test split scale x as long
        schema = json.loads((main / "data" / "prepared" / "schema.json").read_text())
        if (got := schema["text"]["test_tokens"]) != base * scale:
            raise SystemExit(f"the held-out documents hold {got} test tokens, fewer than {base * scale}")
        for stage in ("evaluate", "export"):
            out[stage][scale] = peak_mib(main, stage, log)
            print(f"{stage} at {base * scale} test tokens: {out[stage][scale][0]:.0f} MiB", flush=True)
    return out


def table(results: dict[str, dict], base: int, cache_tokens: int) -> str:
    what = {"evaluate": f"test tokens {base:,} -> {16 * base:,}", "export": f"test tokens {base:,} -> {16 * base:,}",
            "prepare": "corpus: the stdlib documents x1 -> x16",
            "cache_logits": f"cached tokens {cache_tokens:,} -> {16 * cache_tokens:,}"}
    head = ["stage", "scaled", "1x MiB", "4x MiB", "16x MiB", "16x / 1x", "target", "met", "wall 1x / 16x (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, runs in results.items():
        if not {1, 16} <= set(runs):
            continue  # a partial run (--scales): its figures are printed as they come
        ratio = runs[16][0] / runs[1][0]
        four = f"{runs[4][0]:.0f}" if 4 in runs else "–"
        lines.append("| " + " | ".join([stage, what[stage], f"{runs[1][0]:.0f}", four, f"{runs[16][0]:.0f}",
                                        f"{ratio:.2f}", f"≤ {TARGET}", "yes" if ratio <= TARGET else "NO",
                                        f"{runs[1][1]:.0f} / {runs[16][1]:.0f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-tokens", type=int, default=256, help="test tokens at 1x (a multiple of 128)")
    ap.add_argument("--train-tokens", type=int, default=1024, help="tokens the student and its twin train on")
    ap.add_argument("--cache-tokens", type=int, default=1024, help="tokens the teacher caches at 1x the corpus")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects (their path is printed)")
    ap.add_argument("--project", type=Path, help="a kept bench project (its lm/ folder) whose models are trained")
    ap.add_argument("--scales", type=int, nargs="*", default=list(SCALES), choices=SCALES,
                    help="test-split scales to run evaluate and export at")
    ap.add_argument("--skip-corpus", action="store_true", help="leave out prepare and cache_logits")
    args = ap.parse_args()
    if args.test_tokens % SEQ or args.test_tokens <= 0:
        ap.error(f"--test-tokens: a positive multiple of the sequence length {SEQ}")
    tmp = Path(tempfile.mkdtemp(prefix="kd-memory-"))
    log = tmp / "stages.log"
    print(f"projects and the stages' log in {tmp}", flush=True)
    start = time.perf_counter()
    main_proj = args.project or new_project(tmp / "lm", bench_params(args.train_tokens, args.test_tokens))
    if args.project is None:
        for stage in ("prepare", "teacher", "cache_logits", "train_student", "train_baseline"):
            peak_mib(main_proj, stage, log)
    results = test_runs(main_proj, args.test_tokens, sorted(args.scales), log)
    if not args.skip_corpus:
        results |= corpus_runs(main_proj, tmp, args.cache_tokens, args.test_tokens, log)
    print(f"\n{os.cpu_count()} CPU cores ({platform.machine()}), no GPU; peak RSS of each `kd stage` process; "
          f"{(time.perf_counter() - start) / 60:.1f} min in all\n")
    print(table(results, args.test_tokens, args.cache_tokens))
    if args.json:
        args.json.write_text(json.dumps({"test_tokens": args.test_tokens, "cache_tokens": args.cache_tokens,
                                         "results": results}, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(tmp / "lm", ignore_errors=True)
    if any(r[16][0] / r[1][0] > TARGET for r in results.values() if {1, 16} <= set(r)):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
