"""The export stage of a run, and `--quants auto`: choose the quant by measuring it.

The quant people pick by habit (q4_k_m) can lose most of a fine-tuned task's accuracy while q6_k
keeps it, and which one holds depends on the model and the task. `auto` writes every candidate,
answers the run's eval set with each (the recipe's own metric, greedy, the same prompts), and keeps
the smallest file whose score is within `tolerance` points of the 16-bit file's. Without eval data
the score is top-1 agreement with the 16-bit file on the training answers, in percent. Every
candidate's size, real bits per weight, score, KL divergence from the 16-bit file and decode speed
go to gguf/auto.md (+ .json, .png), with the reason the winner won.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from fasttune import UserError, calibrate, gguf, infer, verify

logger = logging.getLogger(__name__)

# Largest first. The calibrated-only ones need an importance matrix (gguf.NEEDS_IMATRIX).
CANDIDATES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m"]
CALIBRATED_CANDIDATES = ["iq4_xs", "q2_k"]
SIXTEEN_BIT = ("bf16", "f16", "f32")
SPEED_TOKENS = 64


def export_run(run_dir: Path, cfg, quants: list[str], lora: tuple[Path, Path] | None = None,
               tolerance: float | None = None) -> list[Path]:
    """Write a run's GGUF files: the importance matrix when anything is quantized (and --imatrix), the
    listed types, then `auto`'s choice. Returns the files, the 16-bit reference first."""
    run_dir = Path(run_dir)
    listed = [q for q in quants if q != "auto"]
    if "auto" in quants and not any(q in SIXTEEN_BIT for q in listed):
        listed.insert(0, "bf16")  # auto measures against a 16-bit file
    quantized = "auto" in quants or any(q not in gguf.DIRECT_TYPES for q in listed)
    matrix = calibrate.for_run(run_dir, cfg) if cfg.export.imatrix and quantized else None
    common = dict(name=run_dir.name, base_model=cfg.model.model, recipe=cfg.recipe, system_prompt=cfg.data.system_prompt)
    files = gguf.export(run_dir / "merged", run_dir / "gguf", listed, lora=lora,
                        imatrix=matrix.values() if matrix else None, **common)
    if "auto" in quants:
        reference = next(f for f in files if f.name.removesuffix(".gguf").rsplit("-", 1)[-1] in SIXTEEN_BIT)
        tol = cfg.export.quant_tolerance if tolerance is None else tolerance
        chosen = choose(run_dir, cfg, reference, matrix, tol, common)
        files += [chosen] if chosen not in files else []
    return files


def _bits_and_speed(path: Path, prompt: list[dict]) -> tuple[float, float]:
    """(real bits per weight, greedy tokens/s over up to SPEED_TOKENS tokens after the prompt)."""
    with infer.load(path) as llm:
        start = time.perf_counter()
        reply = llm.create_chat_completion(messages=prompt, max_tokens=SPEED_TOKENS, temperature=0.0)
        seconds = time.perf_counter() - start
        return infer.bits_per_weight(llm), reply["usage"]["completion_tokens"] / seconds


def choose(run_dir: Path, cfg, reference: Path, matrix, tolerance: float, common: dict) -> Path:
    """Export the candidates beside `reference`, measure them, keep the winner in gguf/, drop the rest."""
    gguf_dir = run_dir / "gguf"
    work = gguf_dir / "candidates"
    candidates = _write_candidates(run_dir, work, reference, matrix, common)
    rows, measure = _measure(run_dir, cfg, reference, candidates, matrix)
    winner, why = pick(rows, tolerance)
    for r in rows:
        r["chosen"] = r is winner
    result = {"measure": measure, "tolerance": tolerance, "reference": reference.name, "winner": winner["file"],
              "why": why, "imatrix": matrix.source if matrix else None, "candidates": rows}
    (gguf_dir / "auto.json").write_text(json.dumps(result, indent=2))
    (gguf_dir / "auto.md").write_text(markdown(result))
    chart(result, gguf_dir / "auto.png")
    logger.info("quant auto: %s", why)

    chosen = reference
    if winner is not rows[0]:
        chosen = gguf_dir / winner["file"]
        (work / winner["file"]).replace(chosen)
        modelfile = f"Modelfile.{chosen.stem}"
        (work / modelfile).replace(gguf_dir / modelfile)
    shutil.rmtree(work)
    return chosen


def _write_candidates(run_dir: Path, work: Path, reference: Path, matrix, common: dict) -> list[Path]:
    """q8_0 from the merged model (our converter); the rest quantized from the reference file."""
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for q in CANDIDATES + (CALIBRATED_CANDIDATES if matrix else []):
        path = work / f"{common['name']}-{q}.gguf"
        if q in gguf.DIRECT_TYPES:
            gguf.convert(run_dir / "merged", path, q, common["name"], common["base_model"], common["recipe"])
        else:
            gguf.quantize(reference, path, q, imatrix=matrix.values() if matrix else None)
        gguf.write_modelfile(path, common["system_prompt"])
        out.append(path)
    return out


def _measure(run_dir: Path, cfg, reference: Path, candidates: list[Path], matrix) -> tuple[list[dict], str]:
    """One row per file (reference first): size, bits/weight, score, KL, top-1, tokens/s; and what the
    score is."""
    from transformers import AutoTokenizer

    from fasttune import data, evaluate

    d = cfg.data
    examples = evaluate.eval_examples(run_dir, cfg) if (d.eval_data or d.eval_fraction) else []
    if examples:
        conversations = [ex.messages for ex in examples]
    else:
        templates = data.Templates(d.user_template, d.assistant_template, d.system_prompt)
        conversations = [ex.messages for ex in data.load(d.data, templates, d.format, on_bad_record="skip",
                                                         split=d.split).examples]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    drift = verify.divergence(reference, candidates, verify.answer_spans(tokenizer, conversations))
    files = [reference, *candidates]
    if examples:
        report = evaluate.evaluate(run_dir, examples, cfg.eval.metric, files, cfg.model.model,
                                   cfg.eval.max_new_tokens, cfg.eval.tolerance, out_dir=run_dir / "gguf" / "auto-eval")
        points = {row["variant"]: 100 * row["score"] for row in report["variants"]}
        measure = f"{cfg.eval.metric} x 100 on {len(examples)} held-out examples"
    else:
        points = {reference.name: 100.0, **{p.name: 100 * drift[p]["top1"] for p in candidates}}
        measure = f"top-1 agreement with {reference.name} (%) on the training answers (no eval data)"

    rows = []
    for path in files:
        kind = path.name.removesuffix(".gguf").rsplit("-", 1)[-1]
        bits, speed = _bits_and_speed(path, conversations[0][:-1])
        rows.append({"file": path.name, "type": kind, "size_mb": round(path.stat().st_size / 1e6, 1),
                     "bits_per_weight": round(bits, 2), "score": round(points[path.name], 2),
                     "kl": round(drift[path]["kl"], 5) if path in drift else 0.0,
                     "top1": round(100 * drift[path]["top1"], 1) if path in drift else 100.0,
                     "tokens_per_s": round(speed, 1),
                     "calibrated": matrix is not None and path != reference and kind not in gguf.DIRECT_TYPES})
    return rows, measure


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
                     f"{r['top1']:.1f} | {r['tokens_per_s']} | {'**chosen**' if r['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def table(result: dict) -> str:
    """What a recipe and export/gguf.py print."""
    head = f"{'file':<34} {'MB':>8} {'bits/w':>7} {'score':>7} {'KL':>8} {'tok/s':>7}"
    lines = [head, "-" * len(head)]
    for r in result["candidates"]:
        lines.append(f"{r['file'][:34]:<34} {r['size_mb']:>8.1f} {r['bits_per_weight']:>7.2f} {r['score']:>7.1f} "
                     f"{r['kl']:>8.4f} {r['tokens_per_s']:>7.1f}" + ("  <- chosen" if r["chosen"] else ""))
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "gguf" / "auto.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check(quants: list[str], imatrix: bool) -> None:
    """Refuse bad --quants before training starts."""
    for q in quants:
        if q != "auto":
            gguf.check_quant_name(q, calibrated=imatrix)
    if quants.count("auto") > 1:
        raise UserError("--quants: 'auto' given twice")
