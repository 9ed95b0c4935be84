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

import fasttune.model as model_lib  # first: imports unsloth, which patches transformers/trl/peft

from pathlib import Path

from fasttune import cli, config, data, gguf, infer, merge, train

SYSTEM_PROMPT = ("You are a clinical assistant. Summarize the case in one or two sentences, "
                 "then answer each question concisely.")
USER_TEMPLATE = "Context: {context}\n\nClinical Scenario: {clinical_scenario}\n\nQuestions: {questions}"
ASSISTANT_TEMPLATE = "Summary: {summary}\n\nAnswers: {answers}"
DEFAULTS = dict(system_prompt=SYSTEM_PROMPT, user_template=USER_TEMPLATE, assistant_template=ASSISTANT_TEMPLATE)


def main(argv=None):
    cfg = config.parse(argv, defaults=DEFAULTS, prog="recipes/clinical_qa.py")
    d = cfg.data

    # Setup: read and validate all data before anything is written.
    train_set = data.load_fields(d.data, d.user_template, d.assistant_template, d.system_prompt)
    eval_set = data.load_fields(d.eval_data, d.user_template, d.assistant_template, d.system_prompt) \
        if d.eval_data else []
    run_dir = config.create_run_dir(cfg)
    model, tokenizer = model_lib.load_for_training(cfg.model, seed=cfg.train.seed)

    # Train: LoRA on the (4-bit) base, loss on assistant tokens.
    train.train(model, tokenizer, train_set, eval_set, cfg, run_dir)
    train.plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")

    # Save: adapter, merged 16-bit model, GGUF files.
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    merge.merge(run_dir / "adapter", run_dir / "merged", base=model_lib.resolve(cfg.model.model))
    files = gguf.export(run_dir / "merged", run_dir / "gguf", cfg.export.quants, name=run_dir.name)

    losses = train.read_metrics(run_dir / "metrics.jsonl")
    print(f"\ntraining loss {losses['loss'][0]:.3f} -> {losses['loss'][-1]:.3f}", end="")
    if losses["eval_loss"]:
        print(f", eval loss {losses['eval_loss'][0]:.3f} -> {losses['eval_loss'][-1]:.3f}", end="")
    print(f"  (curve: {run_dir / 'loss.png'})")
    print(f"run directory: {run_dir}")
    for path in files:
        print(f"  {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    if files and eval_set:
        answer_held_out(files[-1], eval_set[0])
    if files:
        print(f"\nchat with it:  python export/chat.py {files[-1]}")


def answer_held_out(gguf_file: Path, example: data.Example) -> None:
    """Answer one held-out case with the exported file, next to the reference answer."""
    prompt = example.messages[:-1]
    with infer.load(gguf_file) as llm:
        reply = infer.chat(llm, prompt, max_tokens=200)
    choice = reply["choices"][0]
    print(f"\nheld-out case ({example.source}), answered by {gguf_file.name}:")
    print(f"  question : {prompt[-1]['content'][:300]}")
    print(f"  model    : {choice['message']['content'].strip()[:600]}  [finish: {choice['finish_reason']}]")
    print(f"  reference: {example.messages[-1]['content'][:600]}")


if __name__ == "__main__":
    cli.run(main)
