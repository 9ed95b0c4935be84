#!/usr/bin/env python
"""Multiple choice: pick the single best option and name it, letter and text.

Records: `question`, `options` (one per line, "A) ..." to "D) ..."), `answer` (e.g. "B) Metformin").
Judged on the letter; the report also counts letter and option text both right.

    python recipes/multiple_choice.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data recipes/data/multiple_choice.jsonl --eval_data recipes/data/multiple_choice_eval.jsonl \\
        --out runs/mcq

Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

from pathlib import Path

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

TASK = Path(__file__).with_suffix(".yaml")  # system prompt, templates, metric


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=config.read_task(TASK), prog="recipes/multiple_choice.py"))


if __name__ == "__main__":
    cli.run(main)
