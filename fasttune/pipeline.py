"""What every recipe runs, top to bottom: setup -> train -> save -> export -> evaluate.

A recipe script is its task (system prompt, templates, metric, sample data) plus one call to run():
the steps below are the same for every task, so they live here once. Each line is one stage of the
pipeline, one module each (torchtune's recipe shape without a framework).
"""

from __future__ import annotations

from pathlib import Path

import fasttune.model as model_lib  # first: imports unsloth, which patches transformers/trl/peft

from fasttune import (base_model, cli, config, convert, dataset, evaluate, export, free_accelerator_memory, merge,
                      plan, rundir, train)


def run(cfg: config.Config) -> Path | None:
    """Train, merge, export, measure and evaluate; returns the run directory (None for --inspect, --plan)."""
    folder = base_model.check(cfg.model.model, plan=cfg.train.plan)  # a folder that is not a model: one line, now
    if cfg.train.plan:  # memory arithmetic from the model's config alone: nothing is loaded
        cli.print_plan(cfg)
        return None
    # Setup: read, validate and tokenize all data before anything is written.
    export.check(cfg.export.quants, cfg.export.imatrix)  # a typo fails now, not after training
    tokenizer = model_lib.load_tokenizer(cfg.model.model)
    # a checkpoint the converter cannot write fails now, not after training (--inspect exports nothing)
    if cfg.export.quants and not cfg.data.inspect:
        convert.check_convertible(folder, tokenizer, cfg.model.model)
    plan.shapes(cfg.model.model, cfg.model.lora_target_modules)  # LoRA targets the model lacks fail now (meta device)
    check = None
    if cfg.eval.evaluate or "auto" in cfg.export.quants:  # an eval reference the metric cannot read fails now, too
        check = lambda examples: evaluate.check_references(examples, cfg.eval.metric, cfg.eval.tolerance)  # noqa: E731
    # --inspect holds only the examples it shows: its memory does not grow with the file
    td = dataset.build(cfg, tokenizer, hold=cfg.data.inspect_examples if cfg.data.inspect else None, check_eval=check)
    if cfg.data.inspect:
        cli.inspect(td, tokenizer, cfg)
        return None
    run_dir = config.create_run_dir(cfg)
    if cfg.train.resume:  # the same data and base model, or nothing is written
        rundir.check_sources(run_dir, td.sources)
        rundir.check_base(run_dir)
    td.save(run_dir, base_model.identity(cfg.model.model), cfg.train.seed)  # data/, run.json: all later stages read
    model, tokenizer = model_lib.load_for_training(cfg.model, seed=cfg.train.seed)

    # Train: LoRA on the (4-bit) base, loss on assistant tokens.
    train.train(model, tokenizer, td, cfg, run_dir)

    # Save: adapter, merged 16-bit model.
    train.save_adapter(model, tokenizer, run_dir / "adapter")
    del model  # the 4-bit training model: the GPU (or RAM) it holds goes to the evaluation's merged model
    free_accelerator_memory()
    base = base_model.resolve(cfg.model.model)
    merge.merge(run_dir / "adapter", run_dir / "merged", base=base)
    rundir.add_file(run_dir, run_dir / "adapter", "adapter")
    rundir.add_file(run_dir, run_dir / "merged", "merged")

    # Export: the GGUF files (auto: the smallest quant that keeps the score), each measured once.
    result = export.export_run(run_dir, cfg, cfg.export.quants, base=base, lora_gguf=cfg.export.lora_gguf)

    # Evaluate: base vs fine-tuned vs each GGUF on the run's eval data, with the task's metric: eval/
    files = [path for path, _ in result.files]
    scores = evaluate.evaluate_run(run_dir, cfg, base, result.measured, files, result.lora)
    cli.report_run(run_dir, result, td, scores)
    return run_dir
