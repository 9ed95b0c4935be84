#!/usr/bin/env python
"""Closed-form Q&A: answer a question from a given passage with the exact term, nothing more.

Records: `context` (the passage), `question`, `answer` (a short span: a term, a value, a name).
Judged by normalized exact match (case, punctuation and articles ignored).

    python recipes/closed_qa.py --model Qwen/Qwen2.5-0.5B-Instruct --data recipes/data/closed_qa.jsonl \\
        --eval_data recipes/data/closed_qa_eval.jsonl --out runs/closed_qa
    python recipes/closed_qa.py --model tiny --data recipes/data/closed_qa.jsonl --out runs/try --inspect

Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

SYSTEM_PROMPT = "You are a medical reference assistant. Answer with the exact term or value from the passage, nothing else."
USER_TEMPLATE = "Context: {context}\n\nQuestion: {question}\n\nAnswer:"
ASSISTANT_TEMPLATE = "{answer}"
DEFAULTS = dict(format="fields", system_prompt=SYSTEM_PROMPT, user_template=USER_TEMPLATE,
                assistant_template=ASSISTANT_TEMPLATE, metric="exact", max_new_tokens=32)


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=DEFAULTS, prog="recipes/closed_qa.py"))


if __name__ == "__main__":
    cli.run(main)
