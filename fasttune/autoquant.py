"""`--quants auto`: choose the quant by measuring it.

The quant people pick by habit (q4_k_m) can lose most of a fine-tuned task's accuracy while q6_k
keeps it, and which one holds depends on the model and the task. fasttune.export writes every
candidate and fasttune.measure answers the run's eval set with each (the recipe's own metric,
greedy, the same prompts, the same measurement the final evaluation shows); this module keeps
the smallest file whose score is within `tolerance` points of the 16-bit file's. Without eval data
the score is top-1 agreement with the 16-bit file on the training answers, in percent. Every
candidate's size, real bits per weight, score, KL divergence from the 16-bit file and decode speed
go to gguf/auto.md (+ .json, .png), with the reason the winner won.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fasttune import rundir
from fasttune.convert import DIRECT_TYPES

logger = logging.getLogger(__name__)

# Largest first. The calibrated-only ones need an importance matrix (quantize.NEEDS_IMATRIX).
CANDIDATES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m"]
CALIBRATED_CANDIDATES = ["iq4_xs", "q2_k"]


def candidates(calibrated: bool) -> list[str]:
    """The types auto writes and measures, largest first."""
    return CANDIDATES + (CALIBRATED_CANDIDATES if calibrated else [])


def choose(run_dir: Path, rows: list[dict], tolerance: float, calibrated: str | None) -> dict:
    """Pick among measured rows (the 16-bit reference first; fasttune.measure) and write gguf/auto.json,
    auto.md and auto.png. Returns the winning row. calibrated: the importance matrix's source, if any.

    The score is the task metric x 100 on the run's eval examples; without eval data, top-1 agreement
    with the 16-bit file on the answer positions of the training examples."""
    rows = [dict(r) for r in rows]
    if "score" in rows[0]:
        measure = f"task score x 100 on the run's eval examples ({rows[0]['file']} included)"
    else:
        measure = f"top-1 agreement with {rows[0]['file']} (%) on the training answers (no eval data)"
        for r in rows:
            r["score"] = r["top1"]
    for r in rows:
        r["calibrated"] = bool(calibrated) and r is not rows[0] and r["type"] not in DIRECT_TYPES
    winner, why = pick(rows, tolerance)
    for r in rows:
        r["chosen"] = r is winner
    result = {"measure": measure, "tolerance": tolerance, "reference": rows[0]["file"], "winner": winner["file"],
              "why": why, "imatrix": calibrated, "candidates": rows}
    gguf_dir = Path(run_dir) / "gguf"
    rundir.write_json(gguf_dir / "auto.json", result)
    rundir.write_text(gguf_dir / "auto.md", markdown(result))
    chart(result, gguf_dir / "auto.png")
    logger.info("quant auto: %s", why)
    return winner


def pick(rows: list[dict], tolerance: float) -> tuple[dict, str]:
    """(winner, why): the smallest candidate (rows[1:]) whose score is at least the reference's (rows[0])
    minus tolerance; the reference itself when none is."""
    ref = rows[0]
    floor = ref["score"] - tolerance
    within = [r for r in rows[1:] if r["score"] >= floor]
    if not within:
        return ref, f"no quant stayed within {tolerance:g} points of {ref['file']} ({ref['score']:.1f}): keeping it"
    winner = min(within, key=lambda r: r["size_mb"])
    smaller = [r for r in rows[1:] if r["size_mb"] < winner["size_mb"]]
    why = (f"{winner['file']} is the smallest file within {tolerance:g} points of {ref['file']} "
           f"({winner['score']:.1f} vs {ref['score']:.1f})")
    if smaller:
        why += f"; smaller ones fell below {floor:.1f}: " + ", ".join(f"{r['type']} {r['score']:.1f}" for r in smaller)
    return winner, why


def markdown(result: dict) -> str:
    lines = [f"# Quant chosen by measurement: {result['winner']}", "", result["why"] + ".", "",
             f"Score: {result['measure']}; tolerance {result['tolerance']:g} points. "
             f"KL: mean KL({result['reference']} || file) per answer token. "
             + (f"Quantized with an importance matrix from {result['imatrix']}." if result["imatrix"]
                else "No importance matrix."), "",
             "| file | size MB | bits/weight | score | KL | top-1 % | tokens/s | |", "|---|---|---|---|---|---|---|---|"]
    for r in result["candidates"]:
        lines.append(f"| {r['file']} | {r['size_mb']} | {r['bits_per_weight']} | {r['score']:.1f} | {r['kl']:.4f} | "
                     f"{r['top1']:.1f} | {r.get('tokens_per_s') or '-'} | {'**chosen**' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def table(result: dict) -> str:
    """What a recipe and export/gguf.py print."""
    head = f"{'file':<34} {'MB':>8} {'bits/w':>7} {'score':>7} {'KL':>8} {'tok/s':>7}"
    lines = [head, "-" * len(head)]
    for r in result["candidates"]:
        lines.append(f"{r['file'][:34]:<34} {r['size_mb']:>8.1f} {r['bits_per_weight']:>7.2f} {r['score']:>7.1f} "
                     f"{r['kl']:>8.4f} {r.get('tokens_per_s') or 0:>7.1f}" + ("  <- chosen" if r["chosen"] else ""))
    return "\n".join(lines) + f"\n{result['why']}"


def chart(result: dict, path: Path) -> Path:
    """Score against file size, the tolerance band shaded, the winner marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["candidates"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ref = rows[0]["score"]
    ax.axhspan(ref - result["tolerance"], max(ref, max(r["score"] for r in rows)) + 1, color="tab:green", alpha=0.12,
               label=f"within {result['tolerance']:g} points of {rows[0]['type']}")
    for r in rows:
        ax.scatter(r["size_mb"], r["score"], s=80 if r["chosen"] else 30,
                   color="tab:red" if r["chosen"] else "tab:blue", zorder=3)
        ax.annotate(f"{r['type']} ({r['bits_per_weight']} b/w)", (r["size_mb"], r["score"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel(result["measure"][:60])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with rundir.replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def load(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "gguf" / "auto.json"
    return json.loads(path.read_text()) if path.is_file() else None
