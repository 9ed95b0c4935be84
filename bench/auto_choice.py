#!/usr/bin/env python
"""Does the quant `--quants auto` chooses hold on examples it never saw? The rule replayed on many
random splits of an eval set whose answers from every file are known.

    python bench/auto_choice.py [--resamples 500] [--tolerance 1.0]
    python bench/auto_choice.py --run runs/demo        # a fine-tuned run: its data, eval set and metric

Once: write bf16 and every auto candidate (calibrated; with --run also the two mixes and the base
model in q4_k_m with the run's adapter applied at load time, as export writes them), measure each
file's KL from bf16 on the training answers (as export does), and answer every eval prompt with
every file. Then, per resample,
split the eval set at random into a choosing half and a held-out half and apply
    old rule  the smallest file whose score on the choosing half is within the tolerance of bf16's
    new rule  fasttune.autoquant.pick: the paired interval where the half resolves the tolerance,
              else the KL budget; a smaller file only at 10 % fewer bytes
and score each winner on the held-out half against bf16. Printed per rule: how often each file wins,
the mean winner size, and how often the winner loses more than the tolerance on the held-out half.
Default: SmolLM2-135M-Instruct (real weights; bench/smollm2.py) on the multiple-choice recipe's
examples (training and eval files: none were trained on), KL on the closed-QA training answers.
Appends to bench/RESULTS.md.
"""

import argparse
import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

import results  # bench/results.py
from quant import recipe_examples  # bench/quant.py

ROOT = Path(__file__).resolve().parents[1]


def smollm2_setup():
    from smollm2 import smollm2_dir  # bench/smollm2.py

    from fasttune import measure

    model_dir = smollm2_dir()
    train = [ex.messages for ex in recipe_examples("closed_qa", "closed_qa.jsonl")]
    held = (recipe_examples("multiple_choice", "multiple_choice.jsonl")
            + recipe_examples("multiple_choice", "multiple_choice_eval.jsonl"))
    return model_dir, "SmolLM2-135M-Instruct", train, measure.make_task(model_dir, held, "choice", 0.0, 24)


def run_setup(run_dir: Path):
    from fasttune import config, export, rundir

    train = [ex.messages for ex in rundir.in_seeded_order(run_dir, "train")]  # as export and calibrate read them
    return run_dir / "merged", f"run {run_dir.name}", train, export.eval_task(run_dir, config.load_run(run_dir))


def run_extras(run_dir: Path, out: Path, files: list, matrix) -> tuple[list, list]:
    """(files, pairs): auto's mixes and its base + adapter pair for a fine-tuned run."""
    from fasttune import autoquant, export, rundir

    meta = dict(name="m", base_model="bench", recipe="bench")
    mixes = export.write_mixes(run_dir, out, {q: p for p, q in files}, meta, None, matrix)
    pair = export.write_pair(run_dir, out / "lora", rundir.base_dir(run_dir), autoquant.PAIR_BASE, meta, None, matrix)
    return mixes, [pair]


def old_rule(rows, choice, tolerance):
    """The rule auto had before: the smallest file within `tolerance` points, on point estimates."""
    ref = 100 * np.mean(choice[rows[0]["file"]])
    within = [r for r in rows[1:] if 100 * np.mean(choice[r["file"]]) >= ref - tolerance]
    return min(within, key=lambda r: r["size_mb"]) if within else rows[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a fine-tuned run directory instead of SmolLM2")
    parser.add_argument("--resamples", type=int, default=500, help="random choosing/held-out splits")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points a quant may lose (auto's default: 1)")
    a = parser.parse_args()

    import fasttune.model  # noqa: F401  (unsloth first, as every entry point)
    from fasttune import autoquant, calibrate, convert, infer, intervals, measure, quantize

    model_dir, title, train, task = run_setup(a.run) if a.run else smollm2_setup()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        files = [(convert.convert(model_dir, out / "m-bf16.gguf", "bf16"), "bf16"),
                 (convert.convert(model_dir, out / "m-q8_0.gguf", "q8_0"), "q8_0")]
        matrix = calibrate.compute(model_dir, train, source="bench")
        for q in autoquant.candidates(calibrated=True)[1:]:
            files.append((quantize.quantize(files[0][0], out / f"m-{q}.gguf", q, imatrix=matrix.values()), q))
        mixes, pairs = run_extras(a.run, out, files, matrix) if a.run else ([], [])
        files += mixes
        everything = list(range(len(task.prompts)))
        names = [p.name for p, _ in files] + [infer.model_name(b, ad) for b, ad, _ in pairs]
        measured = measure.measure(model_dir, files, train, task, fidelity=False, pairs=pairs,
                                   task_at={name: everything for name in names})
    rows = [m.row for m in measured]
    scores = {m.row["file"]: np.array(m.scores) for m in measured}
    ref = rows[0]["file"]

    rng = random.Random(0)
    n = len(everything)
    wins = {"old": Counter(), "new": Counter()}
    sizes = {"old": [], "new": []}
    loses = {"old": 0, "new": 0}
    for _ in range(a.resamples):
        order = everything[:]
        rng.shuffle(order)
        choose_at, held_at = order[: n // 2], order[n // 2:]
        choice = {f: s[choose_at].tolist() for f, s in scores.items()}
        resolves = intervals.resolution(len(choose_at)) <= a.tolerance
        new, _ = autoquant.pick([dict(r) for r in rows], a.tolerance, choice if resolves else None, n)
        for rule, winner in (("old", old_rule(rows, choice, a.tolerance)), ("new", new)):
            wins[rule][winner["type"]] += 1
            sizes[rule].append(winner["size_mb"])
            loss = 100 * (scores[ref][held_at].mean() - scores[winner["file"]][held_at].mean())
            loses[rule] += loss > a.tolerance

    types = [r["type"] for r in rows]
    full = {r["file"]: intervals.paired(scores[r["file"]], scores[ref]) for r in rows}
    lines = [f"| {title}: {n} {task.metric}-scored prompts, {rows[1]['drift_positions']} training answer positions, "
             f"{a.resamples} random halves, tolerance {a.tolerance:g} | MB | bits/weight | KL vs bf16 | top-1 % | "
             f"score (all {n}) | difference from bf16 (all, 95 %) | old rule wins | new rule wins |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['size_mb']:.1f} | {r['bits_per_weight']:.2f} | {r['kl']:.4f} | "
                     f"{r['top1']:.1f} | {r['score']:.1f} | {full[r['file']]} | "
                     f"{wins['old'][r['type']]} | {wins['new'][r['type']]} |")
    for rule in ("old", "new"):
        lines.append(f"\n{rule} rule: winner {np.mean(sizes[rule]):.1f} MB on average; it loses more than "
                     f"{a.tolerance:g} points to bf16 on the held-out half in {loses[rule]} of {a.resamples} "
                     f"resamples ({100 * loses[rule] / a.resamples:.0f} %)")
    by = ("the task decides" if intervals.resolution(n // 2) <= a.tolerance else
          f"KL decides (budget {autoquant.KL_BUDGET} x q8_0's {rows[types.index('q8_0')]['kl']:.4f})")
    lines.append(f"\nThe choosing half ({n // 2} examples) can rule out losses of "
                 f"{intervals.resolution(n // 2):.1f} points at best: in the new rule {by}.")
    table = "\n".join(lines)
    print(table)
    command = "python bench/auto_choice.py" + (f" --run {a.run}" if a.run else "") + \
        f" --resamples {a.resamples} --tolerance {a.tolerance:g}"
    results.append("bench/auto_choice.py", command, table)


if __name__ == "__main__":
    main()
