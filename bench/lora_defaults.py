#!/usr/bin/env python
"""LoRA defaults on real weights: what Unsloth's fast path (dropout 0) and the alpha/r ratio cost or buy.

    python bench/lora_defaults.py [--train 200] [--eval 150] [--epochs 3]

Dropout 0 and no bias is the plain path of Unsloth's fused LoRA kernels (unsloth 2026.10 runs dropout
inside them too, drawing a mask per adapted input; older releases left the LoRA matmuls unfused);
the QLoRA guide the recipes started from uses dropout 0.1 and alpha 16 at r 64 (updates scaled by
0.25). Each configuration below fine-tunes SmolLM2-135M-Instruct
(bench/smollm2.py, real weights) with recipes/sft.py on the doses task (bench/small_files.py:
"A patient weighs W kg and the dose is 2 mg per kg..." -> "2W mg.", eval weights never trained on),
every other setting the recipe's default. Each merged model is then scored on the held-out prompts:
    task   the numeric metric at tolerance 0, greedy, per example (fasttune.evaluate)
    NLL    the mean negative log-likelihood of each held-out answer and its end-of-turn token, per
           example (the positions training puts the loss on): a low-variance signal of the same thing
Printed: each configuration's scores and its paired difference from the guide's values, with 95 %
intervals over the eval examples (exact for the 0/1 task score, a paired bootstrap for NLL). One
training seed per configuration: the intervals cover which examples were drawn, not the seed.
Appends to bench/RESULTS.md.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import results  # bench/results.py
from small_files import write_doses  # bench/small_files.py
from smollm2 import smollm2_dir  # bench/smollm2.py

ROOT = Path(__file__).resolve().parents[1]

# name -> recipe flags; the first is the baseline every other is compared with
CONFIGS = {
    "guide (alpha 16, dropout 0.1)": ["--lora_alpha", "16", "--lora_dropout", "0.1"],
    "alpha 16, dropout 0": ["--lora_alpha", "16", "--lora_dropout", "0"],
    "alpha 64 = r, dropout 0": ["--lora_alpha", "64", "--lora_dropout", "0"],
    "alpha 128 = 2r, dropout 0": ["--lora_alpha", "128", "--lora_dropout", "0"],
}


def answer_nll(merged: Path, conversations: list[list[dict]]) -> np.ndarray:
    """Per conversation: the mean NLL of its last answer's tokens and end-of-turn token (measure.cases' span)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttune import measure

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for case in measure.cases(tokenizer, conversations, max_positions=10**9):
            logits = model(torch.tensor([case.ids])).logits[0, case.span]
            logp = torch.log_softmax(logits.float(), -1)[torch.arange(len(case.span)), case.targets]
            out.append(-logp.mean().item())
    return np.array(out)


def bootstrap(diff: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=200, help="training examples")
    parser.add_argument("--eval", type=int, default=150, help="eval examples (weights training never saw)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    a = parser.parse_args()
    from fasttune import evaluate, intervals, rundir

    base = smollm2_dir()
    rows, scores, nlls = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, eval_data = write_doses(work, a.train, a.eval)
        for i, name in enumerate(CONFIGS):
            run = work / f"run{i}"
            subprocess.run([sys.executable, "recipes/sft.py", "--model", str(base), "--data", str(data),
                            "--eval_data", str(eval_data), "--out", str(run), "--epochs", str(a.epochs),
                            "--quants", "none", "--evaluate", "false", "--overwrite", *CONFIGS[name]],
                           cwd=ROOT, check=True)
            logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            seconds = next((row["train_runtime"] for row in logs if "train_runtime" in row), None)
            examples = rundir.examples(run, "eval")
            report = evaluate.evaluate(run, examples, "numeric", ["merged"], str(base), max_new_tokens=16,
                                       tolerance=0, out_dir=run / "eval")
            scores[name] = [item["answers"]["merged"]["score"] for item in report["answers"]]
            nlls[name] = answer_nll(run / "merged", [ex.messages for ex in examples])
            rows.append((name, seconds))
            print(f"{name}: task {intervals.mean(scores[name])}, NLL {nlls[name].mean():.3f}", flush=True)

    first = next(iter(CONFIGS))
    lines = ["| configuration | training s | task score (95 % interval) | vs guide, points | answer NLL | "
             "vs guide (95 % interval) |", "|---|---|---|---|---|---|"]
    for name, seconds in rows:
        vs = "baseline" if name == first else str(intervals.paired(scores[name], scores[first]))
        diff = nlls[name] - nlls[first]
        lo, hi = bootstrap(diff)
        nll_vs = "baseline" if name == first else f"{diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
        took = f"{seconds:.0f}" if seconds is not None else "?"
        lines.append(f"| {name} | {took} | {intervals.mean(scores[name])} | {vs} | {nlls[name].mean():.3f} | {nll_vs} |")
    table = "\n".join(lines) + (f"\n\nSmolLM2-135M-Instruct, doses task: {a.train} training and {a.eval} eval examples, "
                                f"{a.epochs:g} epochs, every other setting the recipe's default (r 64, lr 2e-4, "
                                "batch 4); one training seed each.")
    print(table)
    results.append("bench/lora_defaults.py", " ".join(["python", "bench/lora_defaults.py", *sys.argv[1:]]), table)


if __name__ == "__main__":
    main()
