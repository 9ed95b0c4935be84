#!/usr/bin/env python
"""Step-by-step reasoning: work a medication-math problem in numbered steps, then state the answer.

Records: `question`, `reasoning` (the steps), `answer` (number and unit). The sample data covers
tablets to dispense, pump rates, gravity drip rates and weight-based doses, each computed by the
arithmetic its steps show. Judged on the final 'Answer:' line only (numeric, 1 % tolerance, unit
checked): the steps are the model's scratch space.

    python recipes/reasoning_cot.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data recipes/data/reasoning_cot.jsonl --eval_data recipes/data/reasoning_cot_eval.jsonl \\
        --out runs/cot

Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

from pathlib import Path

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

TASK = Path(__file__).with_suffix(".yaml")  # system prompt, templates, metric


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=config.read_task(TASK), prog="recipes/reasoning_cot.py"))


if __name__ == "__main__":
    cli.run(main)
