#!/usr/bin/env python
"""What `--quants auto` costs against the training it follows, and its longest stretch without output.

    python bench/auto_cost.py [--shape 0.5b|tiny] [--train 400] [--eval 150] [--epochs 1] [--work DIR]
    python bench/auto_cost.py --run RUN

The setting: a Qwen2.5-0.5B-shaped model (random weights, the real tokenizer; cached),
fine-tuned by recipes/sft.py on 400 doses examples for 1 epoch (LoRA r 16, alpha 32; no export, no
evaluation), then `export/gguf.py RUN --quant auto` in its own process, its output read as it
comes. Training's time is the trainer's `train_runtime`; both run here, one after the other, so
the ratio compares the two on one machine (llama.cpp and torch do not speed up alike from one CPU to
the next). Printed and appended to bench/RESULTS.md:
    auto / training           the whole export step's wall time over training's
    without the eval answers  less the seconds the 16-bit file and the kept file spend answering the
                              eval prompts (gguf/report.json's answer_seconds), which the recipe's
                              final evaluation reuses instead of answering them again
    the longest silences      the three longest times the export wrote nothing, each with the line before it
    break-even                auto's seconds without the answers, in tokens of training at this run's speed:
                              how much a run must train for auto to cost half of it or less (auto's cost
                              hardly depends on the training set: the candidates are the same files)
--shape tiny runs the same on the test suite's tiny model in a minute (a check of the script);
--run RUN times the export alone on a run trained before, without gguf/ (its train_runtime from
RUN/metrics.jsonl). Only a fresh run of the 0.5B setting is appended to bench/RESULTS.md.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results  # bench/results.py: this script's folder is on sys.path
from small_files import write_doses

ROOT = Path(__file__).resolve().parents[1]


def model_dir(shape: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from fasttune.tiny import QWEN2_5_0_5B_CONFIG, build_model, cache_dir, tiny_model_dir

    return build_model(cache_dir() / "qwen2.5-0.5b-shaped", QWEN2_5_0_5B_CONFIG) if shape == "0.5b" else tiny_model_dir()


def watch(cmd: list[str]) -> tuple[float, list[tuple[float, str]]]:
    """Run cmd; (wall seconds, every gap between two writes of its output, and from the last write to
    its exit, as (seconds, the last line before it), longest first). stdout and stderr share one pipe,
    read as bytes arrive; only the output's tail is kept."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    tail, last, gaps = b"", t0, []

    def last_line() -> str:
        lines = [s for s in re.split(rb"[\r\n]", tail) if s.strip()]
        return lines[-1].decode(errors="replace").strip() if lines else "(start)"

    while chunk := os.read(proc.stdout.fileno(), 65536):
        now = time.perf_counter()
        gaps.append((now - last, last_line()))
        tail, last = (tail + chunk)[-16384:], now
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    gaps.append((t0 + seconds - last, last_line()))
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed ({rc}):\n{tail.decode(errors='replace')[-3000:]}")
    return seconds, sorted(gaps, reverse=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["0.5b", "tiny"], default="0.5b", help="the model trained")
    parser.add_argument("--train", type=int, default=400, help="training examples")
    parser.add_argument("--eval", type=int, default=150, help="eval examples")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--work", type=Path, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--run", type=Path, help="a run trained before, without gguf/: only the export is measured "
                                                 "(--shape, --train, --eval and --epochs do not apply)")
    a = parser.parse_args()
    if a.run and (a.run / "gguf").exists():
        sys.exit(f"--run {a.run}: {a.run / 'gguf'} exists; move it away first (the export must write every file)")

    with tempfile.TemporaryDirectory() as tmp:
        work = (a.work or Path(tmp)).resolve()  # the recipe runs from the repository root
        work.mkdir(parents=True, exist_ok=True)
        run = a.run.resolve() if a.run else work / "run"
        if not a.run:
            data, eval_data = write_doses(work, a.train, a.eval)
            subprocess.run([sys.executable, "recipes/sft.py", "--model", str(model_dir(a.shape)), "--data", str(data),
                            "--eval_data", str(eval_data), "--metric", "numeric", "--tolerance", "0", "--out",
                            str(run), "--epochs", str(a.epochs), "--lora_r", "16", "--lora_alpha", "32",
                            "--learning_rate", "1e-3", "--quants", "none", "--max_new_tokens", "16",
                            "--evaluate", "false", "--overwrite"], cwd=ROOT, check=True)
        logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        training = next((row["train_runtime"] for row in logs if "train_runtime" in row), None)
        tokens = max((row["num_tokens"] for row in logs if "num_tokens" in row), default=None)  # prompts included
        if training is None or tokens is None:
            sys.exit(f"{run / 'metrics.jsonl'}: no train_runtime or num_tokens; the run did not finish training")
        seconds, gaps = watch([sys.executable, "export/gguf.py", str(run), "--quant", "auto"])
        rows = json.loads((run / "gguf" / "report.json").read_text())["files"]
        answering = sum(r.get("answer_seconds") or 0 for r in rows if r["kept"])  # a deleted candidate's are not reused
        auto = json.loads((run / "gguf" / "auto.json").read_text())

    table = "\n".join([
        f"| {f'the run {a.run}' if a.run else f'{a.shape}-shaped, {a.train} doses examples, {a.epochs:g} epoch(s)'} "
        "| s | / training |",
        "|---|---|---|",
        f"| training (`train_runtime`) | {training:.1f} | 1 |",
        f"| `export/gguf.py RUN --quant auto` | {seconds:.1f} | **{seconds / training:.2f} x** |",
        f"| the same without the eval answers the final evaluation reuses ({answering:.1f} s) | "
        f"{seconds - answering:.1f} | **{(seconds - answering) / training:.2f} x** |",
        *[f"| {rank} stretch without output | {gap:.1f} | after: `{before[:90]}` |"
          for rank, (gap, before) in zip(["longest", "second", "third"], gaps)],
        "",
        f"Training read {tokens:,.0f} tokens, {tokens / training:.0f} per second (`train_runtime` counts no model "
        "load and no merge; the export's time counts its imports). Extrapolated at that speed, auto without the "
        f"eval answers costs as much as training on {(seconds - answering) * tokens / training:,.0f} tokens: it is "
        f"half the training or less from {2 * (seconds - answering) * tokens / training:,.0f} training tokens "
        f"({2 * (seconds - answering) / training:.1f} x this run's).",
        f"Files measured: {len(auto['candidates'])}; kept: {auto['winner']} (decided by {auto['decided_by']}); "
        f"not written: {', '.join(auto['not_written']) or 'none'}.",
    ])
    print(table)
    if a.shape == "0.5b" and not a.run:  # the setting above, trained in this run: a check or a rerun is not recorded
        results.append("bench/auto_cost.py", "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
