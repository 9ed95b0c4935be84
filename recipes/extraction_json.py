#!/usr/bin/env python
"""Information extraction as JSON: a clinical note in, one JSON object out.

Records: `note`, and `output`, a JSON object with keys age (number), sex, diagnoses, medications
and allergies (lists; empty when none). The template writes `output` as compact JSON
(`{output:json}`). Judged per key: valid JSON, exact value for age and sex, F1 over list items;
the score is the mean over the keys, and the report counts invalid JSON as unparseable.

    python recipes/extraction_json.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --data recipes/data/extraction_json.jsonl --eval_data recipes/data/extraction_json_eval.jsonl \\
        --out runs/extract

Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

from pathlib import Path

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

TASK = Path(__file__).with_suffix(".yaml")  # system prompt, templates, metric


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=config.read_task(TASK), prog="recipes/extraction_json.py"))


if __name__ == "__main__":
    cli.run(main)
