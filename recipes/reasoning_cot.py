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

from fasttune import pipeline  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config

SYSTEM_PROMPT = ("You are a medication-math tutor. Work step by step, then give the result on a line "
                 "starting with 'Answer:'.")
USER_TEMPLATE = "Problem: {question}\n\nSolution:"
ASSISTANT_TEMPLATE = "{reasoning}\nAnswer: {answer}"
DEFAULTS = dict(format="fields", system_prompt=SYSTEM_PROMPT, user_template=USER_TEMPLATE,
                assistant_template=ASSISTANT_TEMPLATE, metric="cot", tolerance=0.01, max_new_tokens=160)


def main(argv=None):
    pipeline.run(config.parse(argv, defaults=DEFAULTS, prog="recipes/reasoning_cot.py"))


if __name__ == "__main__":
    cli.run(main)
