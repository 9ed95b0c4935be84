#!/usr/bin/env python
"""Evaluate a run's models on held-out data with its task's metric, offline.

    python export/eval.py RUN_DIR                          # base, adapter, merged, every GGUF; the run's eval data
    python export/eval.py RUN_DIR --data more_eval.jsonl   # another eval file, same format as training
    python export/eval.py RUN_DIR --variants adapter runs/mine/gguf/mine-q4_k_m.gguf

Variants: `base` (the model before fine-tuning), `adapter` (base + LoRA, unmerged), `merged`, or
GGUF file paths (run through llama-cpp-python); by default also the run's GGUF LoRA pair (the base
GGUF with the adapter applied at load time) when it has one. Same prompts, greedy, same token budget for all.
The run's eval data is RUN_DIR/data/eval.jsonl, exactly what the recipe evaluated.
Writes RUN_DIR/eval/report.md, report.json and scores.png, and prints the table.
"""

import sys

# Python puts this script's folder first on sys.path, and export/gguf.py is there: without this line
# `import gguf` (the package, which fasttune's converter uses) would import that script instead.
sys.path = [p for p in sys.path if not p.endswith("export")]

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from fasttune import UserError, cli, config, evaluate, infer, rundir  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export/eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run directory written by a recipe")
    parser.add_argument("--data", help="eval file (default: the run's own eval data, RUN_DIR/data/eval.jsonl)")
    parser.add_argument("--variants", nargs="+", metavar="V",
                        help="base, adapter, merged and/or GGUF paths (default: all the run has)")
    parser.add_argument("--metric", choices=sorted(evaluate.METRICS), help="default: the one the recipe recorded")
    parser.add_argument("--max_new_tokens", type=int, help="default: the run's eval max_new_tokens")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--out", type=Path, help="report folder (default: RUN_DIR/eval)")
    args = parser.parse_args(argv)

    rundir.load(args.run_dir)  # refuses a directory that is not a run, or an older layout
    if args.out is None:  # writing into the run: one process per run (a training or an export is refused)
        rundir.lock(args.run_dir)
    cfg = config.load_run(args.run_dir)
    if args.data:  # a user file: read with the run's format and templates, bad records left out and counted
        from fasttune import data

        d = cfg.data
        loaded = data.load(args.data, data.Templates(d.user_template, d.assistant_template, d.system_prompt),
                           d.format, on_bad_record="skip", split=d.split)
        examples = loaded.examples
        if loaded.rejects:
            print(f"{args.data}: {len(loaded.rejects)} records left out (first: {loaded.rejects[0].source}: "
                  f"{loaded.rejects[0].reason})")
    else:
        examples = rundir.examples(args.run_dir, "eval")
        if not examples:
            raise UserError(f"{args.run_dir}: the run has no eval data; pass --data EVAL.jsonl")
    examples = examples[: args.limit]
    variants = args.variants or evaluate.run_variants(args.run_dir)
    for v in args.variants or []:
        if v not in ("base", "adapter", "merged") and not (str(v).endswith(".gguf") and Path(v).is_file()):
            raise UserError(f"--variants {v}: not base, adapter, merged or an existing .gguf file")
    base = cfg.model.model
    if any(v in ("base", "adapter") for v in variants):
        rundir.check_base(args.run_dir)
        base = rundir.base_dir(args.run_dir)
    names = [infer.model_name(*v) if isinstance(v, tuple) else Path(v).name for v in variants]
    notes = None if args.data else evaluate.chosen_on_these(args.run_dir, names)  # auto chose on the run's set
    report = evaluate.evaluate(args.run_dir, examples, args.metric or cfg.eval.metric, variants, base,
                               args.max_new_tokens or cfg.eval.max_new_tokens, cfg.eval.tolerance, args.out,
                               notes=notes)
    out = args.out or args.run_dir / "eval"
    print(evaluate.table(report))
    print(f"\n{out / 'report.md'}  (answers side by side; chart: {out / 'scores.png'})")


if __name__ == "__main__":
    cli.run(main)
