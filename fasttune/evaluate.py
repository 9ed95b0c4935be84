"""Evaluate: answer held-out prompts with every variant of a run and score the answers.

Variants are the models a user could end up running: the base model, the fine-tuned adapter on it
(HF + PEFT), the merged 16-bit model, and each GGUF file through llama-cpp-python. All get the same
chat prompts, greedy decoding and the same token budget. Each answer is scored against the
reference with the task's metric (the table METRICS), and the things that break in practice are
counted too: answers that did not stop by themselves, and answers the metric could not parse.
Writes eval/report.json, eval/report.md and eval/scores.png.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from fasttune import UserError, free_accelerator_memory, intervals
from fasttune.rundir import replacing, write_json, write_text

logger = logging.getLogger(__name__)


# --- metrics: (prediction, reference, tolerance) -> Score ------------------------------------------

@dataclass
class Score:
    score: float  # 0..1: 1 is right (ROUGE-L and JSON field scores are fractions)
    parsed: bool  # the metric found what it looks for (a number, a letter, valid JSON, a final answer)
    detail: dict = field(default_factory=dict)


NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def normalize(text: str) -> str:
    """Lowercase, no punctuation or articles, single spaces (SQuAD's answer normalization)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def final_answer(text: str) -> str | None:
    """What follows the last 'Answer:' (to the end of that line), or None."""
    found = re.findall(r"answer\s*:\s*(.+)", text, flags=re.IGNORECASE)
    return found[-1].strip() if found else None


def _number_and_unit(text: str) -> tuple[float, str] | None:
    """The first number in `text` (commas allowed) and the unit words right after it."""
    match = NUMBER.search(text)
    if not match:
        return None
    value = float(match.group().replace(",", ""))
    unit = text[match.end():].strip().split("(")[0].strip().rstrip(".")
    return value, unit


def _unit_key(unit: str) -> str:
    return re.sub(r"[\s.]", "", unit.lower()).replace("²", "^2").replace("^2", "2")


def score_numeric(pred: str, ref: str, tolerance: float) -> Score:
    """Right when the number is within `tolerance` (relative) and the unit matches the reference's."""
    want = _number_and_unit(final_answer(ref) or ref)
    got = _number_and_unit(final_answer(pred) or pred)
    if want is None:
        raise UserError(f"numeric metric: the reference has no number: {ref[:80]!r}")
    if got is None:
        return Score(0.0, False)
    close = math.isclose(got[0], want[0], rel_tol=tolerance, abs_tol=1e-9)
    unit_ok = not want[1] or _unit_key(got[1]).startswith(_unit_key(want[1]))
    return Score(float(close and unit_ok), True, {"value": got[0], "unit": got[1], "value_ok": close, "unit_ok": unit_ok})


# "B", "B) text", "(b) text", "B. text", "Answer: B: text"; not "A patient ..." (a word, not a letter)
CHOICE = re.compile(r"^\W*(?:answer\s*:?\s*)?\(?([A-E])(?:[).:]|\s*$|\s*\n)\s*(.*)", re.IGNORECASE | re.DOTALL)


def score_choice(pred: str, ref: str, tolerance: float) -> Score:
    """Right when the option letter matches; `letter_and_label` also needs the option's text."""
    want, got = CHOICE.match(ref.strip()), CHOICE.match(pred.strip())
    if want is None:
        raise UserError(f"choice metric: the reference does not start with an option letter: {ref[:80]!r}")
    if got is None:
        return Score(0.0, False)
    letter = got.group(1).upper() == want.group(1).upper()
    label = normalize(want.group(2).splitlines()[0] if want.group(2) else "")
    got_label = normalize(got.group(2).splitlines()[0] if got.group(2) else "")
    return Score(float(letter), True, {"letter": got.group(1).upper(), "letter_and_label": letter and got_label == label})


def score_exact(pred: str, ref: str, tolerance: float) -> Score:
    return Score(float(normalize(pred) == normalize(ref)), bool(pred.strip()))


def _json_object(text: str) -> dict | None:
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _f1(got: list, want: list) -> float:
    got_set, want_set = {normalize(str(x)) for x in got}, {normalize(str(x)) for x in want}
    if not got_set and not want_set:
        return 1.0
    overlap = len(got_set & want_set)
    return 0.0 if not overlap else 2 * overlap / (len(got_set) + len(want_set))


def score_json(pred: str, ref: str, tolerance: float) -> Score:
    """Valid JSON object; per reference key: exact (normalized) for values, F1 for lists; the score is
    the mean over keys (1.0 only when every field is right)."""
    want = _json_object(ref)
    if want is None:
        raise UserError(f"json metric: the reference is not a JSON object: {ref[:80]!r}")
    got = _json_object(pred)
    if got is None:
        return Score(0.0, False)
    fields = {}
    for key, value in want.items():
        if key not in got:
            fields[key] = 0.0
        elif isinstance(value, list):
            fields[key] = _f1(got[key] if isinstance(got[key], list) else [got[key]], value)
        else:
            fields[key] = float(normalize(str(got[key])) == normalize(str(value)))
    return Score(sum(fields.values()) / len(fields), True,
                 {"fields": fields, "keys_present": all(k in got for k in want), "extra_keys": sorted(set(got) - set(want))})


def score_rouge(pred: str, ref: str, tolerance: float) -> Score:
    from rouge_score import rouge_scorer

    value = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    return Score(value, bool(pred.strip()))


def score_cot(pred: str, ref: str, tolerance: float) -> Score:
    """The final 'Answer:' of a worked solution: numeric when the reference's is a number, else exact."""
    want, got = final_answer(ref), final_answer(pred)
    if want is None:
        raise UserError(f"cot metric: the reference has no 'Answer:' line: {ref[-80:]!r}")
    if got is None:
        return Score(0.0, False)
    first = want.split()[0].rstrip(".") if want.split() else ""
    if NUMBER.fullmatch(first):
        inner = score_numeric(got, want, tolerance)
        return Score(inner.score, inner.parsed, {"final": got})
    return Score(float(normalize(got) == normalize(want)), True, {"final": got})


METRICS = {"exact": score_exact, "numeric": score_numeric, "choice": score_choice, "json": score_json,
           "rouge": score_rouge, "cot": score_cot}


# --- generation ---------------------------------------------------------------------------------------

@dataclass
class Answer:
    text: str
    stopped: bool  # ended with the end-of-turn token, not at max_new_tokens
    tokens: int


def answer_hf(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8) -> list[Answer]:
    """Greedy answers from a transformers model, batched with left padding."""
    import torch

    from fasttune.chat_formats import stop_ids

    tokenizer.padding_side = "left"
    stops = stop_ids(tokenizer)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", leave=False):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                       pad_token_id=tokenizer.pad_token_id)
        for row in generated[:, batch["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            stopped = end is not None
            row = row[:end] if stopped else row
            out.append(Answer(tokenizer.decode(row, skip_special_tokens=True).strip(), stopped, len(row)))
    return out


def answer_gguf(path: Path, prompts: list[list[dict]], max_new_tokens: int,
                adapter: Path | None = None) -> list[Answer]:
    """Greedy answers from a GGUF (with a GGUF LoRA `adapter` applied at load time) through
    llama-cpp-python's chat completion (the file's own template)."""
    from fasttune import infer

    with infer.load(path, **({"lora_path": str(adapter)} if adapter else {})) as llm:
        return answer_llm(llm, prompts, max_new_tokens, desc=infer.model_name(path, adapter))


def answer_llm(llm, prompts: list[list[dict]], max_new_tokens: int, desc: str) -> list[Answer]:
    """Greedy answers from a loaded llama_cpp.Llama, one prompt after another."""
    from fasttune import infer

    out = []
    for prompt in tqdm(prompts, desc=desc, unit="example", leave=False):
        reply = infer.chat(llm, prompt, max_tokens=max_new_tokens)
        choice = reply["choices"][0]
        out.append(Answer(choice["message"]["content"].strip(), choice["finish_reason"] == "stop",
                          reply["usage"]["completion_tokens"]))
    return out


def _hf_variant(name: str, run_dir: Path, base: str):
    """(model, tokenizer) for 'base', 'adapter' or 'merged'; float32 on CPU, bf16 on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    path = run_dir / "merged" if name == "merged" else base
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if name == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run_dir / "adapter").eval()
    # the run's tokenizer carries the chat template training used (a base checkpoint may have none)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    return model, tokenizer


# --- the evaluation -----------------------------------------------------------------------------------

def evaluate(run_dir: Path, examples, metric: str, variants: list, base: str, max_new_tokens: int = 256,
             tolerance: float = 0.02, out_dir: Path | None = None, answered: dict | None = None,
             notes: list[str] | None = None) -> dict:
    """Answer `examples` (.source, .messages; the last message is the reference) with each variant and score them.

    variants: 'base', 'adapter', 'merged', paths of GGUF files, or (base GGUF, GGUF LoRA adapter) pairs
    applied at load time. answered: variant name (infer.model_name for GGUF) -> (answers, seconds) already
    generated on these examples (fasttune.measure's, for GGUF files): scored, not generated again.
    notes: lines the report shows under its title. Returns (and writes) the report.
    """
    from fasttune import infer

    if metric not in METRICS:
        raise UserError(f"unknown metric '{metric}'; known: {', '.join(METRICS)}")
    if not examples:
        raise UserError("no eval examples: give the recipe --eval_data (or --eval_fraction), or export/eval.py --data")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [ex.messages[:-1] for ex in examples]
    references = [ex.messages[-1]["content"] for ex in examples]
    scorer = METRICS[metric]

    rows, per_example = [], [{"source": ex.source, "prompt": p[-1]["content"], "reference": r, "answers": {}}
                             for ex, p, r in zip(examples, prompts, references)]
    by_variant = {}  # name -> per-example scores, for the paired intervals
    for variant in variants:
        is_gguf = isinstance(variant, tuple) or str(variant).endswith(".gguf")
        if isinstance(variant, tuple):  # (base GGUF, adapter GGUF)
            name = infer.model_name(*variant)
        else:
            name = Path(variant).name if is_gguf else variant
        logger.info("evaluating %s on %d examples", name, len(examples))
        start = time.perf_counter()
        if name in (answered or {}):
            answers, seconds = answered[name]
        elif is_gguf:
            path, adapter = variant if isinstance(variant, tuple) else (Path(variant), None)
            answers = answer_gguf(path, prompts, max_new_tokens, adapter)
        else:
            model, tokenizer = _hf_variant(variant, run_dir, base)
            answers = answer_hf(model, tokenizer, prompts, max_new_tokens)
            del model
            free_accelerator_memory()
        if name not in (answered or {}):
            seconds = time.perf_counter() - start
        scores = [scorer(a.text, r, tolerance) for a, r in zip(answers, references)]
        for item, a, s in zip(per_example, answers, scores):
            item["answers"][name] = {"text": a.text, "score": round(s.score, 4), "parsed": s.parsed,
                                     "stopped": a.stopped, "tokens": a.tokens, "detail": s.detail}
        n = len(scores)
        by_variant[name] = [s.score for s in scores]
        interval = intervals.mean(by_variant[name])
        rows.append({
            "variant": name,
            "score": round(sum(s.score for s in scores) / n, 4),
            "score_interval": [round(interval.lo / 100, 4), round(interval.hi / 100, 4)],
            # paired, on the same examples: did fine-tuning help (vs base), did export keep it (vs merged)
            **{f"vs_{other}": intervals.paired(by_variant[name], by_variant[other]).as_dict()
               for other in ("base", "merged") if other in by_variant and other != name
               and (other == "base" or is_gguf)},
            "unparseable": round(sum(not s.parsed for s in scores) / n, 4),
            "stopped": round(sum(a.stopped for a in answers) / n, 4),
            "mean_tokens": round(sum(a.tokens for a in answers) / n, 1),
            "seconds_per_example": round(seconds / n, 3),
        })
    report = {"metric": metric, "tolerance": tolerance, "max_new_tokens": max_new_tokens, "examples": len(examples),
              "notes": notes or [], "variants": rows, "answers": per_example}
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
    chart(report, out_dir / "scores.png")
    return report


def table(report: dict) -> str:
    """The compact table a recipe prints."""
    head = (f"{'variant':<28} {report['metric']:>8} {'95 % interval':>15} {'stopped':>8} {'unparsed':>9} "
            f"{'tokens':>7} {'s/ex':>6}")
    lines = [head, "-" * len(head)]
    for r in report["variants"]:
        lo, hi = r["score_interval"]
        lines.append(f"{r['variant'][:28]:<28} {r['score']:>8.3f} {f'[{lo:.3f}, {hi:.3f}]':>15} "
                     f"{100 * r['stopped']:>7.0f}% {100 * r['unparseable']:>8.0f}% {r['mean_tokens']:>7.1f} "
                     f"{r['seconds_per_example']:>6.2f}")
    return "\n".join(lines)


def markdown(report: dict, examples_shown: int = 5) -> str:
    lines = [f"# Evaluation: {report['metric']} on {report['examples']} examples",
             "", f"Greedy, at most {report['max_new_tokens']} new tokens, same prompts for every variant. "
             "Intervals are 95 %; differences are paired (the same examples), in points (score x 100): "
             "an interval that contains 0 shows no difference these examples can resolve.", "",
             *(line for note in report["notes"] for line in (note, "")),
             f"| variant | {report['metric']} [95 % interval] | vs base | vs merged | stopped by itself | unparseable "
             "| mean tokens | s / example |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        lo, hi = r["score_interval"]
        vs_base, vs_merged = (intervals.text(r.get(k), "") for k in ("vs_base", "vs_merged"))
        lines.append(f"| {r['variant']} | {r['score']:.3f} [{lo:.3f}, {hi:.3f}] | {vs_base} | {vs_merged} | "
                     f"{100 * r['stopped']:.0f}% | {100 * r['unparseable']:.0f}% "
                     f"| {r['mean_tokens']} | {r['seconds_per_example']} |")
    for item in report["answers"][:examples_shown]:
        lines += ["", f"## {item['source']}", "", "**Prompt**", "", _quote(item["prompt"]), "", "**Reference**", "",
                  _quote(item["reference"])]
        for name, a in item["answers"].items():
            lines += ["", f"**{name}** (score {a['score']}, {'stopped' if a['stopped'] else 'cut at the limit'})", "",
                      _quote(a["text"] or "(empty)")]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.splitlines())


def chart(report: dict, path: Path) -> Path:
    """Bars per variant: the metric and the share of answers that stopped by themselves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["variant"] for r in report["variants"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 3.5))
    scores = np.array([r["score"] for r in report["variants"]])
    spans = np.array([r["score_interval"] for r in report["variants"]])
    ax.bar(x - 0.2, scores, 0.4, label=f"{report['metric']} (95 % interval)",
           yerr=[scores - spans[:, 0], spans[:, 1] - scores], capsize=3)
    ax.bar(x + 0.2, [r["stopped"] for r in report["variants"]], 0.4, label="stopped by itself")
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{report['metric']} on {report['examples']} held-out examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def check_references(examples, metric: str, tolerance: float) -> None:
    """Every reference answer is one `metric` can read (a number for numeric, a letter for choice, ...):
    checked before training, not found out after export."""
    if metric not in METRICS:
        raise UserError(f"--metric {metric}: unknown; choose one of {', '.join(METRICS)}")
    for ex in examples:
        reference = ex.messages[-1]["content"]
        try:
            METRICS[metric](reference, reference, tolerance)
        except UserError as e:
            raise UserError(f"{ex.source}: {e}; fix the reference or choose another --metric") from None


def run_variants(run_dir: Path) -> list:
    """What export/eval.py evaluates by default: every variant the run has (base, adapter, merged,
    each GGUF model file run.json lists)."""
    from fasttune import rundir

    have = [v for v, path in (("adapter", "adapter/adapter_config.json"), ("merged", "merged/config.json"))
            if (Path(run_dir) / path).is_file()]
    pair = rundir.lora_pair(run_dir)
    return ["base", *have, *(path for path, _ in rundir.models(run_dir)), *([pair[::-1]] if pair else [])]


def evaluate_run(run_dir: Path, cfg, base: str, measured: dict, files: list, pairs: list = ()) -> dict | None:
    """What a recipe runs at the end: base vs fine-tuned (merged) vs each GGUF file and each (adapter,
    base) GGUF LoRA pair on the run's eval examples. The GGUF answers are the ones export measured
    (measured: model name -> Measured)."""
    from fasttune import infer, rundir

    examples = rundir.examples(run_dir, "eval")
    if not cfg.eval.evaluate or not examples:
        if cfg.eval.evaluate:
            logger.info("no eval data (--eval_data or --eval_fraction): evaluation skipped")
        return None
    models = [*files, *((b, a) for a, b in pairs)]
    names = [infer.model_name(*m) if isinstance(m, tuple) else Path(m).name for m in models]
    answered = {n: (measured[n].answers, measured[n].answer_seconds) for n in names
                if n in measured and measured[n].answers and None not in measured[n].answers}
    return evaluate(run_dir, examples, cfg.eval.metric, ["base", "merged", *models], base, cfg.eval.max_new_tokens,
                    cfg.eval.tolerance, answered=answered, notes=chosen_on_these(run_dir, names))


def chosen_on_these(run_dir: Path, names: list[str]) -> list[str]:
    """A warning for the report when --quants auto chose one of `files` on part of these eval examples:
    its score here is biased up by that choice (gguf/auto.md has its score on the rest)."""
    from fasttune import autoquant

    auto = autoquant.load(run_dir)
    if not auto or auto["decided_by"] != "task" or auto["winner"] not in names:
        return []
    return [f"Note: {auto['winner']} was chosen by --quants auto on {auto['choice_examples']} of these "
            f"{auto['eval_examples']} examples, so its score here is biased up by that choice; its score on the "
            f"other {auto['eval_examples'] - auto['choice_examples']}: gguf/auto.md."]
