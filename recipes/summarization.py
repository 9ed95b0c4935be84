#!/usr/bin/env python
"""Summarisation: one handover sentence from a clinical note.

Records: `note` (a few sentences), `summary` (one sentence: who, what, what is being done).
Judged by ROUGE-L F1 against the reference summary (`rouge-score`, stemmed).

    python recipes/summarization.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data recipes/data/summarization.jsonl --eval_data recipes/data/summarization_eval.jsonl \\
        --out runs/summaries

Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

from pathlib import Path

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

TASK = Path(__file__).with_suffix(".yaml")  # system prompt, templates, metric


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=config.read_task(TASK), prog="recipes/summarization.py"))


if __name__ == "__main__":
    cli.run(main)
