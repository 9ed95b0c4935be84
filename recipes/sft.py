#!/usr/bin/env python
"""Supervised fine-tuning on data you already have, in any common shape.

    python recipes/sft.py --model Qwen/Qwen2.5-0.5B-Instruct --data my.jsonl --out runs/mine
    python recipes/sft.py --model tiny --data my.jsonl --out runs/try --inspect   # see the mask first

The format is detected from the first record: `messages` (OpenAI style, multi-turn), ShareGPT
`conversations`, Alpaca `instruction`/`input`/`output`, TRL's `prompt`/`completion`; or name it with
--format (`fields` with --user_template/--assistant_template for any columns). Files: .jsonl,
.json, .csv, .parquet, a `datasets.save_to_disk` folder, or a hub dataset name (online).
The loss falls on every assistant turn (--train_on last: only the final one) and its <|im_end|>.
Every field of fasttune.config is a flag and may come from a YAML file (--config my.yaml).
"""

import fasttune.model as model_lib  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import cli, config, dataset, evaluate, gguf, merge, train, verify


def main(argv=None):
    cfg = config.parse(argv, prog="recipes/sft.py")

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
