#!/usr/bin/env python
"""Clinical QA: summarise a case and answer questions about it.

Each record has `context`, `clinical_scenario` and `questions`; the model learns to write
`summary` and `answers`. The prompt and the completion are built from those fields by the two
templates in clinical_qa.yaml and wrapped in Qwen2.5 ChatML; the loss falls only on the completion and its
<|im_end|>. Defaults are the first user's QLoRA setup (nf4 4-bit, r=64, all projections, lr 2e-4, 3
epochs, constant schedule) with alpha = r and dropout 0 (docs/data.md says why; --lora_alpha 16
--lora_dropout 0.1 are the guide's).

    python recipes/clinical_qa.py --model Qwen/Qwen2.5-0.5B --data my.jsonl --out runs/mine
    python recipes/clinical_qa.py --model tiny --data recipes/data/clinical_qa.jsonl --out runs/demo

Every field of fasttune.config is a flag (--lora_r 16, --epochs 1, --no-4bit, --quants q8_0 ...)
and may come from a YAML file (--config my.yaml); the flag wins.
"""

from pathlib import Path

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

TASK = Path(__file__).with_suffix(".yaml")  # system prompt, templates, metric


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=config.read_task(TASK), prog="recipes/clinical_qa.py"))


if __name__ == "__main__":
    cli.run(main)
