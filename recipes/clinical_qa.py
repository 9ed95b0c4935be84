#!/usr/bin/env python
"""Clinical QA: summarise a case and answer questions about it.

Each record has `context`, `clinical_scenario` and `questions`; the model learns to write
`summary` and `answers`. The prompt and the completion are built from those fields by the two
templates below and wrapped in Qwen2.5 ChatML; the loss falls only on the completion and its
<|im_end|>. Defaults are the first user's QLoRA setup (nf4 4-bit, r=64, alpha=16, dropout 0.1, all
projections, lr 2e-4, 3 epochs, constant schedule).

    python recipes/clinical_qa.py --model Qwen/Qwen2.5-0.5B --data my.jsonl --out runs/mine
    python recipes/clinical_qa.py --model tiny --data recipes/data/clinical_qa.jsonl --out runs/demo

Every field of fasttune.config is a flag (--lora_r 16, --epochs 1, --no-4bit, --quants q8_0 ...)
and may come from a YAML file (--config my.yaml); the flag wins.
"""

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

SYSTEM_PROMPT = ("You are a clinical assistant. Summarize the case in one or two sentences, "
                 "then answer each question concisely.")
USER_TEMPLATE = "Context: {context}\n\nClinical Scenario: {clinical_scenario}\n\nQuestions: {questions}"
ASSISTANT_TEMPLATE = "Summary: {summary}\n\nAnswers: {answers}"
# Free-text answers: ROUGE-L against the reference summary and answers.
DEFAULTS = dict(format="fields", system_prompt=SYSTEM_PROMPT, user_template=USER_TEMPLATE,
                assistant_template=ASSISTANT_TEMPLATE, metric="rouge")


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=DEFAULTS, prog="recipes/clinical_qa.py"))


if __name__ == "__main__":
    cli.run(main)
