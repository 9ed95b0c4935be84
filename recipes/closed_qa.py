#!/usr/bin/env python
"""Closed-form Q&A: answer a question from a given passage with the exact term, nothing more.

Records: `context` (the passage), `question`, `answer` (a short span: a term, a value, a name).
Judged by normalized exact match (case, punctuation and articles ignored).

    python recipes/closed_qa.py --model Qwen/Qwen2.5-0.5B-Instruct --data recipes/data/closed_qa.jsonl \\
        --eval_data recipes/data/closed_qa_eval.jsonl --out runs/closed_qa
    python recipes/closed_qa.py --model tiny --data recipes/data/closed_qa.jsonl --out runs/try --inspect

Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

from pathlib import Path

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

TASK = Path(__file__).with_suffix(".yaml")  # system prompt, templates, metric


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=config.read_task(TASK), prog="recipes/closed_qa.py"))


if __name__ == "__main__":
    cli.run(main)
