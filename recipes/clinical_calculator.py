#!/usr/bin/env python
"""Clinical calculator: apply a named formula to a patient's numbers, show the working, give the
result with its unit.

Records: `calculation` (e.g. "Creatinine clearance (Cockcroft-Gault)"), `patient` (the inputs in
words), `working` (the formula with the numbers substituted), `result`, `unit`. The sample data
covers BMI, mean arterial pressure, anion gap, albumin-corrected calcium and Cockcroft-Gault; every
result was computed from the formula (tests/test_recipes.py recomputes them). Judged numerically:
the number on the 'Answer:' line within 1 % of the reference, and the unit right.

    python recipes/clinical_calculator.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data recipes/data/clinical_calculator.jsonl --eval_data recipes/data/clinical_calculator_eval.jsonl \\
        --out runs/calculator

Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

from pathlib import Path

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

TASK = Path(__file__).with_suffix(".yaml")  # system prompt, templates, metric


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=config.read_task(TASK), prog="recipes/clinical_calculator.py"))


if __name__ == "__main__":
    cli.run(main)
