"""What every recipe runs, top to bottom: setup -> train -> save -> export -> evaluate.

A recipe script is its task (system prompt, templates, metric, sample data) plus one call to run():
the steps below are the same for every task, so they live here once. Each line is one stage of the
pipeline, one module each (torchtune's recipe shape without a framework).
"""

from __future__ import annotations

from pathlib import Path

import fasttune.model as model_lib  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import autoquant, cli, config, dataset, evaluate, merge, train, verify


def run(cfg: config.Config) -> Path | None:
    """Train, merge, export, verify and evaluate; returns the run directory (None for --inspect, --plan)."""
    if cfg.train.plan:  # memory arithmetic from the model's config alone: nothing is loaded
        cli.print_plan(cfg)
        return None
    # Setup: read, validate and tokenize all data before anything is written.
    autoquant.check(cfg.export.quants, cfg.export.imatrix)  # a typo fails now, not after training
    tokenizer = model_lib.load_tokenizer(cfg.model.model)
    td = dataset.build(cfg, tokenizer)
    if cfg.data.inspect:
        cli.inspect(td, tokenizer, cfg)
        return None
    run_dir = config.create_run_dir(cfg)
    td.save(run_dir)
    model, tokenizer = model_lib.load_for_training(cfg.model, seed=cfg.train.seed)

    # Train: LoRA on the (4-bit) base, loss on assistant tokens.
    train.train(model, tokenizer, td, cfg, run_dir)

    # Save: adapter, merged 16-bit model, GGUF files, each GGUF checked against the merged model.
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    base = model_lib.resolve(cfg.model.model)
    merge.merge(run_dir / "adapter", run_dir / "merged", base=base)
    files = autoquant.export_run(run_dir, cfg, cfg.export.quants,  # auto: the smallest quant that keeps the score
                                 lora=(run_dir / "adapter", base) if cfg.export.lora_gguf else None)
    fidelity = verify.verify_run(run_dir, files)  # gguf/report.json

    # Evaluate: base vs fine-tuned vs each GGUF on the held-out data, with the task's metric: eval/
    scores = evaluate.evaluate_run(run_dir, cfg, td.eval.prepared.kept if td.eval else [], files, base)
    cli.report_run(run_dir, files, td, fidelity, scores)
    return run_dir
