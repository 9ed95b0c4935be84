#!/usr/bin/env python
"""Export a run's merged model as GGUF files, offline, reading nothing but the run directory.

    python export/gguf.py RUN_DIR                      # the types the recipe's config lists
    python export/gguf.py RUN_DIR --quant bf16 q8_0 q4_k_m
    python export/gguf.py RUN_DIR --quant auto [--tolerance 1.0]   # chosen by measurement

bf16/f16/f32/q8_0 are written by fasttune's own converter (the `gguf` package); k-quants and the
other llama.cpp types are made from the 16-bit file by llama-cpp-python's bundled quantizer,
calibrated by an importance matrix from the run's training conversations (unless the run says
imatrix: false, or --no-imatrix). auto writes the candidates (the plain types, two mixes that keep
the tensors the fine-tune moved most at q8_0, and the base model in q4_k_m with the LoRA adapter
applied at load time) and keeps one: shown (95 % interval) to
lose less than --tolerance points of eval score against the 16-bit file when the eval set can show
that, else within a KL budget; a smaller file only when it is at least 10 % smaller (report, with
the winner's score on eval examples the choice did not use: RUN_DIR/gguf/auto.md). Every file is
measured (fidelity, drift, task score: RUN_DIR/gguf/report.json) and listed in RUN_DIR/run.json.
Files land in RUN_DIR/gguf/<run name>-<type>.gguf. No network, no llama.cpp build.
"""

import sys

# Python puts this script's folder first on sys.path, and this file is named gguf.py: without
# this line `import gguf` (the package) would import this script instead.
sys.path = [p for p in sys.path if not p.endswith("export")]

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from fasttune import UserError, cli, config, rundir  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export/gguf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run directory written by a recipe")
    parser.add_argument("--quant", nargs="+", metavar="TYPE",
                        help="types to write (default: the recipe config's `quants`), e.g. bf16 q8_0 q4_k_m")
    parser.add_argument("--tolerance", type=float,
                        help="auto: points of eval score a quant may lose against the 16-bit file (default: the "
                             "run's quant_tolerance, 1.0); the score decides only where the eval set can resolve it")
    parser.add_argument("--imatrix", action=argparse.BooleanOptionalAction, default=None,
                        help="calibrate quantized types on the run's training texts (default: the run's setting)")
    parser.add_argument("--lora", action="store_true",
                        help="also write gguf/lora/: the adapter as a GGUF LoRA and the base model in the first type")
    args = parser.parse_args(argv)
    # torch and transformers take about 5 s to import on 2 cores: say so before that silence
    print(f"exporting {args.run_dir}: loading torch and transformers", file=sys.stderr, flush=True)

    from fasttune import export  # after --help: it imports torch and transformers

    manifest = rundir.load(args.run_dir)  # refuses a directory that is not a run, or an older layout
    rundir.lock(args.run_dir)  # one process per run: a training or another export is refused, naming it
    cfg = config.load_run(args.run_dir)
    for split in manifest["data"]:
        rundir.examples(args.run_dir, split)  # refuses the run's data if it changed since training
    quants = args.quant or cfg.export.quants
    if not quants:
        raise UserError("no types to export: pass --quant bf16 q4_k_m (the run's config lists none)")
    if args.imatrix is not None:
        cfg.export.imatrix = args.imatrix
    export.check(quants, cfg.export.imatrix)
    merged, adapter = args.run_dir / "merged", args.run_dir / "adapter"
    lora = args.lora or cfg.export.lora_gguf
    base = None
    if lora or not (merged / "config.json").is_file():
        rundir.check_base(args.run_dir)  # the merge and the LoRA base read the base model: it must be the run's
        base = rundir.base_dir(args.run_dir)
    elif "auto" in quants:  # auto's base + adapter candidate needs the base model, but auto goes on without
        try:
            rundir.check_base(args.run_dir)
            base = rundir.base_dir(args.run_dir)
        except UserError as e:
            print(f"auto goes on without its base + adapter candidate: {e}", file=sys.stderr)
    if not (merged / "config.json").is_file():
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{args.run_dir}: no merged model and no adapter; the run did not finish training "
                            "(continue it with the recipe's --resume)")
        from fasttune import merge

        merge.merge(adapter, merged, base=base)  # a lost or deleted merge, made again
        rundir.add_file(args.run_dir, merged, "merged")
    result = export.export_run(args.run_dir, cfg, quants, base=base, lora_gguf=lora, tolerance=args.tolerance)
    cli.print_export(args.run_dir, result)


if __name__ == "__main__":
    cli.run(main)
