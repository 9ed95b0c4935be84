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

from fasttune import cli, config, dataset, evaluate, gguf, merge, train, verify

SYSTEM_PROMPT = ("You are a clinical assistant. Summarize the case in one or two sentences, "
                 "then answer each question concisely.")
USER_TEMPLATE = "Context: {context}\n\nClinical Scenario: {clinical_scenario}\n\nQuestions: {questions}"
ASSISTANT_TEMPLATE = "Summary: {summary}\n\nAnswers: {answers}"
DEFAULTS = dict(format="fields", system_prompt=SYSTEM_PROMPT, user_template=USER_TEMPLATE,
                assistant_template=ASSISTANT_TEMPLATE)


def main(argv=None):
    cfg = config.parse(argv, defaults=DEFAULTS, prog="recipes/clinical_qa.py")

    # Setup: read, validate and tokenize all data before anything is written.
    tokenizer = model_lib.load_tokenizer(cfg.model.model)
    td = dataset.build(cfg, tokenizer)
    if cfg.data.inspect:
        return cli.inspect(td, tokenizer, cfg)
    run_dir = config.create_run_dir(cfg)
    td.save(run_dir)
    model, tokenizer = model_lib.load_for_training(cfg.model, seed=cfg.train.seed)

    # Train: LoRA on the (4-bit) base, loss on assistant tokens.
    train.train(model, tokenizer, td, cfg, run_dir)

    # Save: adapter, merged 16-bit model, GGUF files.
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    base = model_lib.resolve(cfg.model.model)
    merge.merge(run_dir / "adapter", run_dir / "merged", base=base)
    files = gguf.export(run_dir / "merged", run_dir / "gguf", cfg.export.quants, name=run_dir.name,
                        base_model=cfg.model.model, recipe=cfg.recipe, system_prompt=cfg.data.system_prompt,
                        lora=(run_dir / "adapter", base) if cfg.export.lora_gguf else None)
    report = verify.verify_run(run_dir, files)  # each file against the merged model: gguf/report.json

    # Evaluate: base vs fine-tuned vs each GGUF on the held-out data, with the task's metric: eval/
    scores = evaluate.evaluate_run(run_dir, cfg, td.eval.prepared.kept if td.eval else [], files, base)
    cli.report_run(run_dir, files, td, report, scores)


if __name__ == "__main__":
    cli.run(main)
