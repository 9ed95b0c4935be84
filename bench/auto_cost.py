#!/usr/bin/env python
"""What `--quants auto` costs against the training it follows, and its longest stretch without output.

    python bench/auto_cost.py [--shape 0.5b|tiny] [--train 400] [--eval 150] [--epochs 1] [--work DIR]

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
--run RUN measures the export on a run trained before (its train_runtime from RUN/metrics.jsonl),
deleting RUN/gguf first.
"""

import argparse
import json
import os
import re
import shutil
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
    """Run cmd; (wall seconds, every gap between two writes of its output as (seconds, the last line
    before it), longest first). stdout and stderr share one pipe, read as bytes arrive."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out, last, gaps = b"", t0, []
    while chunk := os.read(proc.stdout.fileno(), 65536):
        now = time.perf_counter()
        lines = [s for s in re.split(rb"[\r\n]", out[-4096:]) if s.strip()]  # the tail: the line before the gap
        gaps.append((now - last, lines[-1].decode(errors="replace").strip() if lines else "(start)"))
        out, last = out + chunk, now
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed ({rc}):\n{out.decode(errors='replace')[-3000:]}")
    return seconds, sorted(gaps, reverse=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["0.5b", "tiny"], default="0.5b", help="the model trained")
    parser.add_argument("--train", type=int, default=400, help="training examples")
    parser.add_argument("--eval", type=int, default=150, help="eval examples")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--work", type=Path, help="keep the run here (default: a temporary folder)")
    parser.add_argument("--run", type=Path, help="a run trained before: only the export is measured")
    a = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, eval_data = write_doses(work, a.train, a.eval)
        run = a.run or work / "run"
        if a.run:
            shutil.rmtree(run / "gguf", ignore_errors=True)
        else:
            subprocess.run([sys.executable, "recipes/sft.py", "--model", str(model_dir(a.shape)), "--data", str(data),
                            "--eval_data", str(eval_data), "--metric", "numeric", "--tolerance", "0", "--out",
                            str(run), "--epochs", str(a.epochs), "--lora_r", "16", "--lora_alpha", "32",
                            "--learning_rate", "1e-3", "--quants", "none", "--max_new_tokens", "16",
                            "--evaluate", "false", "--overwrite"], cwd=ROOT, check=True)
        logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        training = next(row["train_runtime"] for row in logs if "train_runtime" in row)
        tokens = max(row["num_tokens"] for row in logs if "num_tokens" in row)  # the trainer's count, prompts included
        seconds, gaps = watch([sys.executable, "export/gguf.py", str(run), "--quant", "auto"])
        rows = json.loads((run / "gguf" / "report.json").read_text())["files"]
        answering = sum(r.get("answer_seconds") or 0 for r in rows)
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
        f"Training read {tokens:,.0f} tokens ({tokens / training:.0f} per second). Auto without the eval answers "
        f"costs as much as training on {(seconds - answering) * tokens / training:,.0f} tokens: it is half the "
        f"training or less once a run trains on {2 * (seconds - answering) * tokens / training:,.0f} tokens or more "
        f"({2 * (seconds - answering) / training:.1f} x this run's).",
        f"Files measured: {len(auto['candidates'])}; kept: {auto['winner']} (decided by {auto['decided_by']}); "
        f"not written: {', '.join(auto['not_written']) or 'none'}.",
    ])
    print(table)
    results.append("bench/auto_cost.py", "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
