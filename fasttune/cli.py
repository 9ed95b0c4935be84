"""What every script shares: logging setup, the exit-code contract, and what a recipe prints.

Exit codes: 0 success, 2 bad input, usage, or a machine limit the user must lift (disk full, GPU
memory): one line per problem on stderr, no traceback; 1 anything else (with its traceback,
because that is a bug to report).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings

from fasttune import UserError


def setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False, markup=False)],
        force=True,  # unsloth installs a root handler at import; ours replaces it
    )
    # Quiet the libraries' own chatter; our modules log what a user needs.
    # llama-cpp-python routes llama.cpp's own log (per-tensor quantize lines, model dumps) here.
    # absl: rouge-score logs "Using default tokenizer." on every scorer it builds.
    for name in ("httpx", "urllib3", "filelock", "datasets", "gguf", "llama-cpp-python", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, over the file-size limit, over quota


def run(main) -> None:
    """Call main(); turn a UserError into `error: ...` and exit 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: the disk is full{where} ({os.strerror(e.errno)}). Free space and run the same command "
              "again: files are written under temporary names, so nothing broken is left under a final name "
              "(training continues with --resume, export with python export/gguf.py RUN_DIR)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def report_run(run_dir, result, td, scores=None) -> None:
    """What a recipe prints at the end: loss change, files and their fidelity, one held-out answer,
    the evaluation table, how to chat and serve. result: export.Result (every number printed here was
    measured there, once per file)."""
    from fasttune import evaluate, train

    losses = train.read_metrics(run_dir / "metrics.jsonl")
    line = (f"\ntraining loss {losses['loss'][0]:.3f} -> {losses['loss'][-1]:.3f}" if losses["loss"] else
            "\nno training loss was logged (--logging_steps is more than the run's optimizer steps)")
    if losses["eval_loss"]:
        line += f", eval loss {losses['eval_loss'][0]:.3f} -> {losses['eval_loss'][-1]:.3f}"
    print(f"{line}  (curve: {run_dir / 'loss.png'})")
    print(f"run directory: {run_dir}  (contents: {run_dir / 'run.json'})")
    print_export(run_dir, result)
    name = chosen_name(run_dir, result)
    chosen = result.measured.get(name) if name else None
    if td.eval and chosen and chosen.answers and chosen.answers[0] is not None:
        example, answer = td.eval.prepared.kept[0], chosen.answers[0]
        print(f"\nheld-out case ({example.source}), answered by {name}:")
        print(f"  question : {example.messages[-2]['content'][:300]}")
        print(f"  model    : {answer.text[:600]}  [{'stopped' if answer.stopped else 'cut at the token limit'}]")
        print(f"  reference: {example.messages[-1]['content'][:600]}")
    if scores:
        print(f"\nevaluation on {scores['examples']} held-out examples ({run_dir / 'eval' / 'report.md'}):")
        print(evaluate.table(scores))
    model = chosen_model(run_dir, result)
    if model:
        print(f"\nchat with it:  python export/chat.py {model}")
        print(f"serve it:      python export/serve.py {model}   (OpenAI-compatible, http://127.0.0.1:8000/v1)")


def chosen_name(run_dir, result) -> str | None:
    """The model a user runs, as reports name it: what auto kept (a pair included), else the last file written."""
    from fasttune import autoquant, infer

    auto = autoquant.load(run_dir)
    kept = [infer.model_name(base, adapter) for adapter, base in result.lora] + [p.name for p, _ in result.files]
    if auto and auto["winner"] in kept:
        return auto["winner"]
    return result.files[-1][0].name if result.files else None


def chosen_model(run_dir, result) -> str | None:
    """The arguments chat and serve take for chosen_name: a file, or a base file with `--lora ADAPTER`."""
    from fasttune import infer

    name = chosen_name(run_dir, result)
    for adapter, base in result.lora:
        if name == infer.model_name(base, adapter):
            return f"{base} --lora {adapter}"
    return next((str(p) for p, _ in result.files if p.name == name), None)


def print_plan(cfg) -> None:
    """--plan: the memory table (fasttune.plan)."""
    from fasttune import plan

    print(plan.describe(cfg.model, cfg.train, cfg.train.gpu_gb))


def print_export(run_dir, result) -> None:
    """The files an export kept, the auto table when it chose one, each file's fidelity."""
    from fasttune import autoquant, infer, measure

    for path in [p for p, _ in result.files] + [p for pair in result.lora for p in pair]:
        print(f"  {path}  ({path.stat().st_size / 1e6:.1f} MB)")
    kept = {p.name for p, _ in result.files} | {infer.model_name(b, a) for a, b in result.lora}
    auto = autoquant.load(run_dir)
    if auto and auto["winner"] in kept:
        print(f"quant chosen by measurement ({run_dir / 'gguf' / 'auto.md'}):")
        print("  " + autoquant.table(auto).replace("\n", "\n  "))
    rows = [m.row for m in result.measured.values() if "tokenization_identical" in m.row and m.row["file"] in kept]
    if rows:
        print(f"fidelity against the merged model ({run_dir / 'gguf' / 'report.json'}):")
        for row in rows:
            print(f"  {measure.line(row)}")


def inspect(td, tokenizer, cfg) -> None:
    """--inspect: show the mask and statistics, write the page, train nothing."""
    from pathlib import Path

    from fasttune import preview

    page = preview.inspect(td, tokenizer, Path(cfg.train.out) / "inspect", cfg.data.inspect_examples)
    print(f"\nmask page: {page}  (length histogram and rejects beside it)")
