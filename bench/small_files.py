#!/usr/bin/env python
"""Small files that keep the fine-tune: merged quants against the mixes and the quantized base with an
unrounded adapter, on real weights fine-tuned for a task whose answers are numbers.

    python bench/small_files.py [--train 300] [--eval 150] [--epochs 3] [--variants as_is off_grid]

The task: "A patient weighs W kg and the dose is 2 mg per kg. How many mg in total?" -> "2W mg.",
W from 10 to 999, drawn without repeats (seeded); the eval weights are ones training never saw,
scored with the numeric metric at tolerance 0. Doubling a 2- or 3-digit number is a skill a 135M
model has only in part; a short fine-tune moves it, and that movement is what rounding can undo.
Base: SmolLM2-135M-Instruct (bench/smollm2.py), in two variants:
    as_is     the weights as shipped: dequantized from Q4_1, so every linear weight sits on a 4-bit grid
              (re-quantizing snaps small deltas back onto it: worse than a true 16-bit checkpoint)
    off_grid  the same with uniform noise of one Q4_1 grid step, (max - min) / 15 of its 32-weight
              block, added to every linear weight of the blocks before fine-tuning
Each variant: recipes/sft.py trains it (LoRA r 16, alpha 32), then bench/auto_choice.py --run
measures bf16, every auto candidate, the two mixes and the base + adapter pair on every eval prompt
(size, bits/weight, KL and top-1 against bf16, score, the paired difference with its 95 % interval)
and replays the rule on random halves. Appends to bench/RESULTS.md (through auto_choice.py); the
training runs stay in --work (default: a temporary folder).
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_doses(folder: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    weights = random.Random(0).sample(range(10, 1000), n_train + n_eval)
    paths = folder / "doses.jsonl", folder / "doses_eval.jsonl"
    for path, part in zip(paths, (weights[:n_train], weights[n_train:])):
        with path.open("w") as f:
            for w in part:
                messages = [{"role": "user", "content": f"A patient weighs {w} kg and the dose is 2 mg per kg. "
                                                        "How many mg in total?"},
                            {"role": "assistant", "content": f"{2 * w} mg."}]
                f.write(json.dumps({"messages": messages}) + "\n")
    return paths


def off_grid(src: Path, dst: Path) -> Path:
    """`src` with uniform noise of one Q4_1 grid step per 32-weight block on every linear weight of the blocks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight  # (out, in): GGUF's 32-weight blocks run along `in`
                blocks = w.view(w.shape[0], -1, 32)
                step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 15
                blocks += (torch.rand_like(blocks) - 0.5) * step
    model.to(torch.bfloat16).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=300, help="training examples")
    parser.add_argument("--eval", type=int, default=150, help="eval examples (weights training never saw)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="more recipe flags, last")
    parser.add_argument("--variants", nargs="+", choices=["as_is", "off_grid"], default=["as_is", "off_grid"])
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    a = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from smollm2 import smollm2_dir

    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data, eval_data = write_doses(work, a.train, a.eval)
        for variant in a.variants:
            base = smollm2_dir() if variant == "as_is" else off_grid(smollm2_dir(), work / "smollm2-off-grid")
            run = work / f"doses-{variant}"
            subprocess.run([sys.executable, "recipes/sft.py", "--model", str(base), "--data", str(data),
                            "--eval_data", str(eval_data), "--metric", "numeric", "--tolerance", "0", "--out", str(run),
                            "--epochs", str(a.epochs), "--lora_r", "16", "--lora_alpha", "32",
                            "--learning_rate", str(a.learning_rate), "--quants", "none", "--max_new_tokens", "16",
                            "--evaluate", "false", "--overwrite", *a.train_args], cwd=ROOT, check=True)
            subprocess.run([sys.executable, "bench/auto_choice.py", "--run", str(run), "--resamples",
                            str(a.resamples)], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
