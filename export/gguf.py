#!/usr/bin/env python
"""Export a run's merged model as GGUF files, offline.

    python export/gguf.py RUN_DIR                      # the types the recipe's config lists
    python export/gguf.py RUN_DIR --quant bf16 q8_0 q4_k_m

bf16/f16/f32/q8_0 are written by fasttune's own converter (the `gguf` package); k-quants and the
other llama.cpp types are made from the 16-bit file by llama-cpp-python's bundled quantizer.
Files land in RUN_DIR/gguf/<run name>-<type>.gguf. No network, no llama.cpp build.
"""

import sys

# Python puts this script's folder first on sys.path, and this file is named gguf.py: without
# this line `import gguf` (the package) would import this script instead.
sys.path = [p for p in sys.path if not p.endswith("export")]

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from fasttune import UserError, cli, config, gguf, verify  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export/gguf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="run directory written by a recipe")
    parser.add_argument("--quant", nargs="+", metavar="TYPE",
                        help="types to write (default: the recipe config's `quants`), e.g. bf16 q8_0 q4_k_m")
    parser.add_argument("--lora", action="store_true",
                        help="also write gguf/lora/: the adapter as a GGUF LoRA and the base model in the first type")
    args = parser.parse_args(argv)
    cfg = config.load_run(args.run_dir)
    merged, adapter = args.run_dir / "merged", args.run_dir / "adapter"
    if not (merged / "config.json").is_file():
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"{args.run_dir}: no merged model and no adapter; the run did not finish training "
                            "(continue it with the recipe's --resume)")
        from fasttune import merge
        from fasttune.model import resolve  # imports unsloth (slow): only when the base model is needed

        merge.merge(adapter, merged, base=resolve(cfg.model.model))  # a lost or deleted merge, made again
    quants = args.quant or cfg.export.quants
    if not quants:
        raise UserError("no types to export: pass --quant bf16 q4_k_m (the run's config lists none)")
    lora = None
    if args.lora or cfg.export.lora_gguf:
        # imports unsloth (slow): only when the base model is needed
        from fasttune.model import resolve

        lora = (args.run_dir / "adapter", resolve(cfg.model.model))
    files = gguf.export(merged, args.run_dir / "gguf", quants, name=args.run_dir.name, base_model=cfg.model.model,
                        recipe=cfg.recipe, system_prompt=cfg.data.system_prompt, lora=lora)
    rows = verify.verify_run(args.run_dir, files)
    for path in files + list(gguf.lora_pair(args.run_dir / "gguf") or []):
        print(f"{path}  ({path.stat().st_size / 1e6:.1f} MB)")
    for row in rows:
        print(f"  {verify.line(row)}")


if __name__ == "__main__":
    cli.run(main)
