#!/usr/bin/env python
"""How many tokens the importance matrix needs: KL of calibrated quants against the matrix's token cap,
on real weights, measured on conversations the matrix never read.

    python bench/imatrix_tokens.py [--variants as_is off_grid] [--positions 2048]

fasttune.calibrate reads at most MAX_TOKENS tokens of a run's training conversations; on a 2-core CPU
that pass is a fifth of `--quant auto`'s time on a 0.5B model. Here the matrix is computed on the
first N tokens of one seeded shuffle of every recipe's training file (N doubling up to 32,768),
each matrix calibrates q4_k_m, iq4_xs, q3_k_m and q2_k, and each file's KL from the bf16 file is
measured on every recipe's eval file (answer positions, up to --positions). Per cell: KL / the KL with
the largest matrix, on the same conversations, with a 95 % bootstrap interval over conversations;
"none" is the uncalibrated file (q4_k_m and q3_k_m only), for the size of what the matrix buys.
Base: SmolLM2-135M-Instruct as shipped (dequantized Q4_1: its weights sit on a 4-bit grid) and off
that grid (bench/small_files.py's off_grid). Appends to bench/RESULTS.md.
"""

import argparse
import random
import tempfile
from pathlib import Path

import results  # bench/results.py

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["clinical_qa", "closed_qa", "clinical_calculator", "multiple_choice", "summarization", "extraction_json",
           "reasoning_cot"]
TYPES = ["q4_k_m", "iq4_xs", "q3_k_m", "q2_k"]
PLAIN = ["q4_k_m", "q3_k_m"]  # the types llama.cpp also makes without a matrix
CAPS = [1024, 2048, 4096, 8192, 16384, 32768]


def conversations(split: str) -> list[list[dict]]:
    from quant import recipe_examples  # bench/quant.py

    out = [ex.messages for r in RECIPES for ex in recipe_examples(r, f"{r}{split}.jsonl")]
    random.Random(0).shuffle(out)  # a run's stages read its training file in a seeded order too
    return out


def measure_variant(model_dir: Path, work: Path, positions: int) -> tuple[list[str], dict]:
    """Table rows for one model: the cap -> {type: (KL, ratio, lo, hi)}."""
    from transformers import AutoTokenizer

    from fasttune import autoquant, calibrate, convert, measure, quantize

    train, held_out = conversations(""), conversations("_eval")
    cases = measure.cases(AutoTokenizer.from_pretrained(model_dir), held_out, max_positions=positions)
    bf16 = convert.convert(model_dir, work / "bf16.gguf", "bf16")
    reference = measure.measure_file(bf16, "bf16", None, cases, None, None).logprobs

    def case_kl(path: Path) -> list[float]:
        return measure.measure_file(path, path.stem, None, cases, reference, None).case_kl

    kl, tokens = {}, {}
    for cap in CAPS:
        calibrate.MAX_TOKENS = cap  # _batches reads it at each call
        matrix = calibrate.compute(model_dir, train, source="recipes/data/*.jsonl")
        tokens[cap] = matrix.tokens
        for q in TYPES:
            kl[cap, q] = case_kl(quantize.quantize(bf16, work / f"{q}-{cap}.gguf", q, imatrix=matrix.values()))
        if matrix.tokens < cap:  # every training token read: a larger cap is the same matrix
            break
    caps = list(tokens)
    for q in PLAIN:
        kl["none", q] = case_kl(quantize.quantize(bf16, work / f"{q}-none.gguf", q))
    rows = []
    for cap in caps + ["none"]:
        cells = []
        for q in TYPES:
            if (cap, q) not in kl:
                cells.append("-")
                continue
            value, lo, hi = autoquant.kl_ratio(kl[caps[-1], q], kl[cap, q], 0.95)
            mean = sum(kl[cap, q]) / sum(len(c.span) for c in cases)
            cells.append(f"{mean:.4f} ({value:.3f} [{lo:.3f}, {hi:.3f}])")
        label = "none" if cap == "none" else f"{tokens[cap]:,}"
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows, {"positions": sum(len(c.span) for c in cases), "conversations": len(cases),
                  "largest": tokens[caps[-1]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=["as_is", "off_grid"], default=["as_is", "off_grid"])
    parser.add_argument("--positions", type=int, default=2048, help="held-out answer positions KL is measured on")
    a = parser.parse_args()

    import fasttune.model  # noqa: F401  (unsloth first, as every entry point)
    from small_files import off_grid  # bench/small_files.py
    from smollm2 import smollm2_dir  # bench/smollm2.py

    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for variant in a.variants:
            model_dir = smollm2_dir() if variant == "as_is" else off_grid(smollm2_dir(), work / "off-grid")
            rows, info = measure_variant(model_dir, work, a.positions)
            header = (f"| SmolLM2-135M-Instruct {variant}: matrix tokens | "
                      + " | ".join(f"{q}: KL (/ largest [95 %])" for q in TYPES) + " |")
            tables.append("\n".join([header, "|---" * (len(TYPES) + 1) + "|", *rows]) +
                          f"\n\nKL from the bf16 file over {info['positions']} answer positions of "
                          f"{info['conversations']} held-out conversations (the recipes' eval files); "
                          f"the matrix reads the first N tokens (N up to {info['largest']:,}) of one "
                          f"seeded shuffle of the recipes' training files.")
    table = "\n\n".join(tables)
    print(table)
    results.append("bench/imatrix_tokens.py", f"python bench/imatrix_tokens.py --variants {' '.join(a.variants)} "
                   f"--positions {a.positions}", table)


if __name__ == "__main__":
    main()
