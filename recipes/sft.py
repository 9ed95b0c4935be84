#!/usr/bin/env python
"""Supervised fine-tuning on data you already have, in any common shape.

    python recipes/sft.py --model Qwen/Qwen2.5-0.5B-Instruct --data my.jsonl --out runs/mine
    python recipes/sft.py --model tiny --data my.jsonl --out runs/try --inspect   # see the mask first

The format is detected from the first record: `messages` (OpenAI style, multi-turn), ShareGPT
`conversations`, Alpaca `instruction`/`input`/`output`, TRL's `prompt`/`completion`; or name it with
--format (`fields` with --user_template/--assistant_template for any columns). Files: .jsonl,
.json, .csv, .parquet, a `datasets.save_to_disk` folder, or a hub dataset name (online).
The loss falls on every assistant turn (--train_on last: only the final one) and its <|im_end|>.
With --eval_data, answers are scored with --metric (default exact match; see export/eval.py).
Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config


def main(argv=None):
    pipeline.run(config.parse(argv, prog="recipes/sft.py"))


if __name__ == "__main__":
    cli.run(main)
