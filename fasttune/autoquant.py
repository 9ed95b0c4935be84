"""`--quants auto`: choose the quant by measuring it, and say how sure the choice is.

The quant people pick by habit (q4_k_m) can lose most of a fine-tuned task while q6_k keeps it, and
which one holds depends on the model and the task. fasttune.export writes the candidates and
fasttune.measure measures each against the 16-bit file as it is written; this module decides:

1. Which files qualify. With enough eval examples to resolve --quant_tolerance, the task decides: the
   files are tested in an order fixed by KL (then size), from the most faithful down, on half of the
   eval set; a file qualifies when the 95 % interval of its paired score difference from the 16-bit
   file rules out a loss of the tolerance or more (fasttune.intervals), and testing stops at the
   first that does not. A smaller set cannot show that (12 examples cannot rule out a 30-point
   loss), so the low-variance signal decides instead: the KL divergence from the 16-bit file over
   the answer positions of the training examples, within KL_BUDGET times q8_0's own (8-bit
   rounding, the loss nobody can measure in a task score, sets the scale): the upper end of the
   95 % interval of that ratio, over conversations, must be within it. Then llama.cpp's ladder
   (CANDIDATES) is walked from the most bits down and stops at the first type that does not qualify,
   as the task's test stops: the smaller types are never written (nor the mixes, without q4_k_m).
2. Which of them wins. Starting from the 16-bit file, walk the qualifying files from the most
   faithful (lowest KL) down; a file replaces the current choice only when it is at least 10 %
   smaller. A 1 % smaller file that is ten times less faithful buys nothing.
3. What it scores. The chosen file's score is reported on eval examples that took no part in the
   choice (the other half when the task decided; all of them when KL did), with its interval.

gguf/auto.md (+ .json, .png) shows each measured candidate's size, bits per weight, KL, top-1 agreement,
the paired differences that were measured, each file's verdict, and the reason for the winner.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np

from fasttune import intervals, measure, mix, rundir
from fasttune.convert import DIRECT_TYPES
from fasttune.quantize import NEEDS_IMATRIX

logger = logging.getLogger(__name__)

# llama.cpp's ladder, most bits per weight first (iq4_xs 4.25, q3_k_m about 3.9); the types of
# quantize.NEEDS_IMATRIX only with an importance matrix. When KL decides, auto walks it in this order and
# stops at the first type that does not qualify: the types after it are not written (fixed-sequence, as
# the task's test; a type with fewer bits is not expected to be more faithful).
CANDIDATES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m", "q2_k"]
# Beside them (fasttune.export): the mixes of fasttune.mix, and the base model in PAIR_BASE with the
# run's adapter applied at load time, unrounded (the delta survives a base rounded coarsely).
PAIR_BASE = "q4_k_m"
KL_BUDGET = 10  # a file's KL from the 16-bit file may be at most this many times q8_0's
# A file's KL pass stops early at one of measure.LOOKS once this interval of its KL / q8_0's (on the same
# conversations) lies wholly on one side of KL_BUDGET. 99 %, not 95 %: each look is a chance to err.
SCREEN_CONFIDENCE = 0.99
SCREEN_CONVERSATIONS = 20  # and only after this many conversations: a bootstrap over fewer is too narrow to trust
SMALLER = 0.9  # a less faithful file wins only at this fraction of the size of the one it replaces, or less
# The task decides only when half the eval set could show a loss below this share of the tolerance: at
# exactly the tolerance, one disagreement would fail every file.
RESOLVE = 0.5


def candidates(calibrated: bool) -> list[str]:
    """The types auto may write and measure, most bits first."""
    return [q for q in CANDIDATES if calibrated or q not in NEEDS_IMATRIX]


def task_decides(n: int, tolerance: float) -> bool:
    """Whether half of n eval examples can resolve `tolerance` points (with room for a few disagreements)."""
    return n >= 2 and intervals.resolution(n // 2) <= RESOLVE * tolerance


def split(n: int, tolerance: float, seed: int) -> tuple[list[int], list[int]]:
    """(choice, report): which of n eval examples (by position) the task decides on, and which report
    the chosen file's score. When the task cannot decide: no choice examples, all n report."""
    if not task_decides(n, tolerance):
        return [], list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[: n // 2]), sorted(order[n // 2:])


def examples_needed(tolerance: float) -> int:
    """How many eval examples it takes for the task to decide at `tolerance` points."""
    n = 2
    while not task_decides(n, tolerance) and n < 10**8:
        n *= 2
    lo, hi = n // 2, n
    while lo + 1 < hi:  # task_decides is monotone in n: the smallest n where it holds
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if task_decides(mid, tolerance) else (mid, hi)
    return hi


def kl_ratio(yardstick: list[float], kl: list[float], confidence: float | None = None):
    """A file's KL from the 16-bit file over q8_0's, on the conversations both were measured on (KL
    summed per conversation: yardstick is q8_0's, kl the file's, the first len(kl) conversations).
    With confidence: (ratio, lo, hi), a seeded bootstrap over conversations (positions within one
    conversation are not independent). 0/0 is 0: a file that equals the 16-bit file where q8_0 does."""
    a, b = np.asarray(kl, dtype=np.float64), np.asarray(yardstick[: len(kl)], dtype=np.float64)

    def ratio(top, bottom):
        return np.divide(top, bottom, out=np.where(top > 0, np.inf, 0.0), where=bottom > 0)

    value = float(ratio(a.sum(), b.sum()))
    if confidence is None:
        return value
    if len(a) < 2:  # one conversation says nothing about the spread
        return value, float("nan"), float("nan")
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(a), (intervals.RESAMPLES, len(a)))
    lo, hi = np.quantile(ratio(a[draws].sum(1), b[draws].sum(1)), [(1 - confidence) / 2, (1 + confidence) / 2])
    return value, float(lo), float(hi)


def settled(yardstick: list[float], kl: list[float]) -> bool:
    """Whether more conversations would, at SCREEN_CONFIDENCE, not move the file across KL_BUDGET
    (measure.measure's `settled`): after SCREEN_CONVERSATIONS at least, that interval of kl_ratio excludes it."""
    if len(kl) < SCREEN_CONVERSATIONS:
        return False
    _, lo, hi = kl_ratio(yardstick, kl, SCREEN_CONFIDENCE)
    return hi < KL_BUDGET or lo > KL_BUDGET


def ratio_fields(yardstick: list[float], kl: list[float]) -> dict:
    """What a row records of its KL / q8_0's: the ratio, and its 95 % interval when there are
    SCREEN_CONVERSATIONS conversations for a bootstrap to stand on (else None: the point ratio decides)."""
    value, lo, hi = kl_ratio(yardstick, kl, intervals.CONFIDENCE)
    enough = len(kl) >= SCREEN_CONVERSATIONS
    return {"kl_ratio": round(value, 4), "kl_ratio_interval": [round(lo, 4), round(hi, 4)] if enough else None}


def within(difference: intervals.Interval, tolerance: float) -> bool:
    """The task's test: the paired interval shows the file loses less than `tolerance` points."""
    return difference.lo > -tolerance


def yardstick(rows: list[dict]) -> dict | None:
    """The measured q8_0 row, whose KL sets the budget (None: none was measured)."""
    return next((r for r in rows if r["type"] == measure.YARDSTICK and r.get("kl") is not None), None)


def _ratio(row: dict, q8: dict | None) -> float:
    """A row's KL / q8_0's (its own `kl_ratio`, on the positions it was measured on, where recorded);
    its KL without a q8_0; infinite when not measured or not finite (the least faithful)."""
    if row.get("kl") is None or not np.isfinite(row["kl"]):
        return float("inf")
    return row["kl"] if q8 is None else row.get("kl_ratio", kl_ratio([q8["kl"]], [row["kl"]]))


def kl_verdict(row: dict, q8: dict | None) -> tuple[bool, str]:
    """(qualifies, verdict) when KL decides: the upper end of the ratio's 95 % interval, where measured,
    within KL_BUDGET (a ratio whose interval straddles the budget is a coin flip that the next run's
    rounding may turn either way), else the ratio itself."""
    if q8 is None:
        return False, "no q8_0 to set the KL budget"
    ratio = _ratio(row, q8)
    if (row.get("kl_ratio_interval") or [None, ratio])[1] <= KL_BUDGET:
        return True, "KL within the budget"
    return False, ("KL over the budget" if ratio > KL_BUDGET
                   else "KL may be over the budget (the upper end of its interval is)")


def _faithfulness(rows: list[dict]):
    """Sort key, most faithful first: KL / q8_0's (else KL), then size."""
    q8 = yardstick(rows)
    return lambda r: (_ratio(r, q8), r["size_mb"])


def order(rows: list[dict]) -> list[dict]:
    """The candidates (rows[1:]) from the most faithful down: the order the task tests them in, fixed
    before any eval score is seen."""
    return sorted(rows[1:], key=_faithfulness(rows))


def pick(rows: list[dict], tolerance: float, choice: dict[str, list[float]] | None = None,
         n_eval: int = 0) -> tuple[dict, str]:
    """(winner, why) among measured rows, the 16-bit reference first. Each row gets `qualifies`,
    `verdict` and, when the task decided, `difference` (its paired interval against the reference).

    choice: the per-example scores on the choice examples (the task decides) of the reference and of
    every file tested, or None (KL decides; n_eval, the eval set's size, explains why in `why`).

    The files are taken in one order, fixed before any eval score is seen: by KL (training answers),
    then size. The task tests them along it and stops at the first one it cannot show within the
    tolerance (fixed-sequence testing: the chance that any file passing really loses more stays at
    2.5 %, without a correction for testing several); the files after it need no eval answers.
    """
    ref = rows[0]
    q8 = yardstick(rows[1:])
    budget = KL_BUDGET * q8["kl"] if q8 else None
    ranked = order(rows)
    stopped_at = None
    for r in ranked:
        if choice is not None:
            if stopped_at:
                r["qualifies"] = False
                r["verdict"] = f"not tested: {stopped_at['type']}, more faithful, was not shown within"
                continue
            d = intervals.paired(choice[r["file"]], choice[ref["file"]])
            r["difference"] = d.as_dict()
            r["qualifies"] = within(d, tolerance)
            r["verdict"] = (f"shown to lose less than {tolerance:g} points" if r["qualifies"]
                            else f"may lose {-d.lo:.1f} points")
            stopped_at = None if r["qualifies"] else r
        else:
            r["qualifies"], r["verdict"] = kl_verdict(r, q8)
    winner = ref
    for r in (r for r in ranked if r["qualifies"]):
        if r["size_mb"] <= SMALLER * winner["size_mb"]:
            if winner is not ref:
                winner["verdict"] += f"; replaced by {r['type']}, at least 10 % smaller"
            winner = r
        else:
            r["verdict"] += f"; not 10 % smaller than {winner['type']}"
    for r in rows:
        r["chosen"] = r is winner
    if choice is not None:
        n = len(choice[ref["file"]])
        rule = (f"shown to lose less than {tolerance:g} points against {ref['file']} on {n} eval examples "
                "(the lower end of its paired 95 % interval, files tested from the most faithful down)")
        detail = f": difference {intervals.text(winner['difference'])}" if winner is not ref else ""
    else:
        rule = (f"within the KL budget of {KL_BUDGET} x q8_0's divergence from {ref['file']} ({budget:.4g})"
                if budget is not None else "measured against q8_0")
        detail = ("" if winner is ref else f": KL {winner['kl']:.4g}" + (
            f", {ratio_text(winner)} x q8_0's on the same {winner['drift_positions']} positions"
            if winner.get("kl_ratio") is not None and "drift_positions" in winner else ""))
        rule_out = ("the task score did not decide: no eval data" if not n_eval else
                    "the task score did not decide: one eval example cannot be halved" if n_eval == 1 else
                    f"the task score did not decide: at best, {n_eval // 2} of the {n_eval} eval examples can show "
                    f"a file loses less than {intervals.resolution(n_eval // 2):.1f} points; deciding at "
                    f"{tolerance:g} takes about {examples_needed(tolerance)} eval examples")
    if winner is ref:
        why = f"no quant was {rule}: keeping {ref['file']}"
    else:
        why = f"{winner['file']} is {rule}{detail}, and no other such file is at least 10 % smaller"
    return winner, why + ("" if choice is not None else f"; {rule_out}")


def choose(rows: list[dict], tolerance: float, calibrated: str | None, choice: dict[str, list[float]] | None,
           n_eval: int, no_pair: str | None = None, not_written: dict[str, str] | None = None) -> dict:
    """The decision as gguf/auto.json records it; `report` adds the held-out score and writes it.
    no_pair: why the base + adapter pair is not among the rows (None: it is); not_written: candidate
    type -> why it was not written (the ladder stopped before it)."""
    rows = [dict(r) for r in rows]
    for r in rows:
        r["calibrated"] = bool(calibrated) and r is not rows[0] and r["type"] not in DIRECT_TYPES
    winner, why = pick(rows, tolerance, choice, n_eval)
    logger.info("quant auto: %s", why)
    return {"decided_by": "task" if choice is not None else "kl", "tolerance": tolerance, "kl_budget": KL_BUDGET,
            "reference": rows[0]["file"], "winner": winner["file"], "why": why, "imatrix": calibrated,
            "choice_examples": len(next(iter(choice.values()))) if choice else 0, "eval_examples": n_eval,
            "frontier": frontier(rows), "no_pair": no_pair, "not_written": not_written or {}, "candidates": rows}


def frontier(rows: list[dict]) -> list[str]:
    """The files no smaller file beats on faithfulness (KL / q8_0's): the most faithful per byte, smallest first."""
    key = _faithfulness(rows)
    measured = sorted((r for r in rows if r.get("kl") is not None), key=lambda r: (r["size_mb"], key(r)[0]))
    out, best = [], float("inf")
    for r in measured:
        if key(r)[0] < best:
            out.append(r["file"])
            best = key(r)[0]
    return out


def report(run_dir: Path, result: dict, held_out: tuple[list[float], list[float]] | None) -> dict:
    """Add the chosen file's score on the examples that took no part in the choice (its scores and
    the reference's there), and write gguf/auto.json, auto.md and auto.png."""
    if held_out and held_out[0]:
        ref, win = held_out
        result["held_out"] = {"examples": len(ref), "reference": intervals.mean(ref).as_dict()}
        if result["winner"] != result["reference"]:  # a file against itself differs by exactly 0
            result["held_out"] |= {"winner": intervals.mean(win).as_dict(),
                                   "difference": intervals.paired(win, ref).as_dict()}
    gguf_dir = Path(run_dir) / "gguf"
    rundir.write_json(gguf_dir / "auto.json", result)
    rundir.write_text(gguf_dir / "auto.md", markdown(result))
    chart(result, gguf_dir / "auto.png")
    return result


def ratio_text(row: dict, interval: bool = True) -> str:
    """A row's KL / q8_0's as reports print it: "3.1 [2.4, 4.0]" ("-": not measured against q8_0)."""
    if row.get("kl_ratio") is None:
        return "-"
    lo, hi = row.get("kl_ratio_interval") or (None, None)
    return f"{row['kl_ratio']:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if interval and lo is not None else "")


def positions_text(row: dict) -> str:
    """Answer positions (conversations) a row's KL is over."""
    if "drift_positions" not in row:
        return "-"
    return f"{row['drift_positions']}" + (f" ({row['drift_conversations']})" if "drift_conversations" in row else "")


def screening_line() -> str:
    return (f"KL / q8_0's is on the same answer positions (up to {measure.MAX_POSITIONS}), with a 95 % interval "
            f"over conversations when there are {SCREEN_CONVERSATIONS} or more (else the ratio alone decides). "
            f"When KL decides, a file's KL pass stops at the first conversation past "
            f"{', '.join(map(str, measure.LOOKS))} positions, from {SCREEN_CONVERSATIONS} conversations on, once "
            f"the {100 * SCREEN_CONFIDENCE:g} % interval of that ratio lies wholly above or below the budget of "
            f"{KL_BUDGET}: at that confidence, more positions would not move it across.")


def not_written_line(result: dict) -> str:
    """The candidates auto skipped, grouped by why."""
    why: dict[str, list[str]] = {}
    for qtype, reason in result["not_written"].items():
        why.setdefault(reason, []).append(qtype)
    return ("Not written or measured, as KL decides and llama.cpp's ladder is walked from the most bits down, "
            "stopping at the first type that does not qualify: "
            + "; ".join(f"{', '.join(types)} ({reason})" for reason, types in why.items()) + ".")


def held_out_line(result: dict) -> str:
    h = result.get("held_out")
    if not h:
        return "No eval data: the chosen file's task score is not measured."
    if "winner" not in h:
        return (f"On {h['examples']} eval examples that took no part in the choice: {result['reference']} scores "
                f"{intervals.text(h['reference'])} (points, 95 % interval).")
    return (f"On {h['examples']} eval examples that took no part in the choice: {result['winner']} scores "
            f"{intervals.text(h['winner'])}, {result['reference']} {intervals.text(h['reference'])}; difference "
            f"{intervals.text(h['difference'])} (points, 95 % intervals).")


def markdown(result: dict) -> str:
    by_task = result["decided_by"] == "task"
    rule = (f"Qualifies: the paired 95 % interval of the file's score minus {result['reference']}'s, on "
            f"{result['choice_examples']} of the {result['eval_examples']} eval examples, lies above "
            f"-{result['tolerance']:g} points." if by_task else
            f"Qualifies: mean KL({result['reference']} || file) per answer token of the training examples at most "
            f"{result['kl_budget']} x q8_0's, at the upper end of the ratio's 95 % interval. The eval set could not have decided, so no paired differences were "
            "measured for the choice: only the files kept answer the eval prompts (the line above), and those "
            "listed with --quants.")
    lines = [f"# Quant chosen by measurement: {result['winner']}", "", result["why"] + ".", "",
             held_out_line(result), "",
             "Most faithful per byte (no smaller file has a lower KL), smallest first: "
             + ", ".join(result["frontier"]) + ".", "",
             rule + " Among the files that qualify, from the most faithful down, a file replaces the choice only "
             "when it is at least 10 % smaller. "
             + screening_line() + " "
             + (f"Quantized with an importance matrix from {result['imatrix']}." if result["imatrix"]
                else "No importance matrix."), "",
             f"Mixed precision: {mix.describe()}. A `base-...gguf + "
             "...-lora.gguf` row: the base model quantized, the LoRA adapter kept in F32 and applied at load time "
             "(`--lora`); its size is both files'."
             + (f" No such pair was measured: {result['no_pair']}." if result.get("no_pair") else ""), "",
             *([not_written_line(result), ""] if result.get("not_written") else []),
             "| file | size MB | bits/weight | KL | KL / q8_0's (95 %) | positions (conversations) | top-1 % |"
             + (" difference (choice examples) |" if by_task else "")
             + " verdict | |", "|---|---|---|---|---|---|---|" + ("---|" if by_task else "") + "---|---|"]
    for r in result["candidates"]:
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "-"
        top1 = f"{r['top1']:.1f}" if r.get("top1") is not None else "-"
        lines.append(f"| {r['file']} | {r['size_mb']} | {r['bits_per_weight']} | {kl} | {ratio_text(r)} | "
                     f"{positions_text(r)} | {top1} | "
                     + (f"{intervals.text(r.get('difference'))} | " if by_task else "")
                     + f"{r.get('verdict', 'reference')} | {'**chosen**' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def table(result: dict) -> str:
    """What a recipe and export/gguf.py print."""
    by_task = result["decided_by"] == "task"
    head = (f"{'file':<44} {'MB':>8} {'bits/w':>7} {'KL':>8} {'x q8_0':>8} {'top-1%':>7}"
            + (f" {'difference':>20}" if by_task else ""))
    lines = [head, "-" * len(head)]
    for r in result["candidates"]:
        lines.append(f"{r['file'][:44]:<44} {r['size_mb']:>8.1f} {r['bits_per_weight']:>7.2f} "
                     f"{r.get('kl') or 0:>8.4f} {ratio_text(r, interval=False):>8} {r.get('top1') or 0:>7.1f}"
                     + (f" {intervals.text(r.get('difference')):>20}" if by_task else "")
                     + ("  <- chosen" if r["chosen"] else ""))
    skipped = f"\n{not_written_line(result)}" if result.get("not_written") else ""
    return "\n".join(lines) + f"\n{result['why']}\n{held_out_line(result)}{skipped}"


def chart(result: dict, path: Path) -> Path:
    """Left: KL / q8_0's against size, with its 95 % interval where measured, the budget drawn, each
    file in the legend (labels next to points collide when sizes are nearly equal). Right: every
    measured score difference from the 16-bit file with its 95 % interval as an error bar, the
    tolerance drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["candidates"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    key = _faithfulness(rows)
    floor = 1e-3  # a log axis: ratios of 0 (the file equals the 16-bit one) drawn at the floor
    for i, r in enumerate(r for r in rows[1:] if r.get("kl") is not None and np.isfinite(key(r)[0])):
        y = max(key(r)[0], floor)
        lo, hi = r.get("kl_ratio_interval") or (y, y)
        left.errorbar(r["size_mb"], y, yerr=[[y - max(lo, floor)], [max(hi, floor) - y]], capsize=3,
                      fmt="os^vD<>p*h"[i % 10], markersize=9 if r["chosen"] else 6,
                      markeredgecolor="black" if r["chosen"] else "none", zorder=3,
                      label=f"{r['type']}: {r['size_mb']} MB, {r['bits_per_weight']} b/w"
                            + (" (chosen)" if r["chosen"] else ""))
    left.axhline(result["kl_budget"], color="tab:green", linestyle="--", label=f"budget: {result['kl_budget']} x")
    left.set_yscale("log")
    left.set_xlabel("file size (MB)")
    left.set_ylabel(f"KL from {rows[0]['type']} / q8_0's (95 % interval)")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    bars = [(r["type"], r["difference"]) for r in rows[1:] if r.get("difference")]
    held = result.get("held_out")
    if held and "difference" in held:
        bars.append((f"{next(r['type'] for r in rows if r['chosen'])}\n(held out)", held["difference"]))
    for x, (label, d) in enumerate(bars):
        right.errorbar(x, d["value"], yerr=[[d["value"] - d["lo"]], [d["hi"] - d["value"]]], fmt="o", capsize=4,
                       color="tab:red" if "held out" in label else "tab:blue")
    right.axhline(-result["tolerance"], color="tab:green", linestyle="--", label=f"-{result['tolerance']:g} points")
    right.axhline(0, color="gray", linewidth=0.8)
    right.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    right.set_xlim(-0.7, max(len(bars), 1) - 0.3)
    right.set_ylabel(f"score minus {rows[0]['type']}'s (points, 95 % interval)")
    right.set_title("task decided" if result["decided_by"] == "task" else "task: held-out check only", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    with rundir.replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def load(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "gguf" / "auto.json"
    return json.loads(path.read_text()) if path.is_file() else None
