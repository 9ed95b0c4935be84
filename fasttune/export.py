"""The export stage of a run: merged model -> GGUF files, each measured once, each listed in run.json.

    write     the listed types (bf16/f16/f32/q8_0 by fasttune.convert, the rest by llama.cpp from the
              16-bit file, calibrated by the run's importance matrix), `auto`'s candidates in
              gguf/candidates/, the GGUF LoRA pair, a Modelfile beside every model file
    measure   each file once, as soon as it is written (fasttune.measure), on the run's own data; when
              KL decides, auto writes its ladder only down to the first type that does not qualify
    choose    `auto`: keep one candidate (fasttune.autoquant), delete the rest
The recipe and export/gguf.py both call export_run. The quant type of every file travels with it
as data ((path, type) pairs, run.json's `type`), never parsed back from a file name.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fasttune import UserError, autoquant, cached_tokenizer, calibrate, infer, intervals, measure, mix, rundir
from fasttune.chat_formats import served_template
from fasttune.convert import DIRECT_TYPES, convert
from fasttune.lora_gguf import convert_lora
from fasttune.modelfile import write_modelfile
from fasttune.quantize import check_quant_name, quantize

logger = logging.getLogger(__name__)

SIXTEEN_BIT = ("bf16", "f16", "f32")


@dataclass
class Result:
    files: list[tuple[Path, str]]  # the model files kept, (path, quant type), the 16-bit reference first
    measured: dict[str, measure.Measured] = field(default_factory=dict)  # model name (infer.model_name) -> measurement
    lora: list[tuple[Path, Path]] = field(default_factory=list)  # (adapter GGUF, base GGUF) pairs kept


def check(quants: list[str], imatrix: bool) -> None:
    """Refuse bad --quants before training starts."""
    for q in quants:
        if q != "auto":
            check_quant_name(q, calibrated=imatrix)
    if quants.count("auto") > 1:
        raise UserError("--quants: 'auto' given twice")


def write_types(model_dir: Path, out_dir: Path, types: list[str], meta: dict, system_prompt: str | None,
                matrix=None, source16: Path | None = None) -> list[tuple[Path, str]]:
    """Write <name>-<type>.gguf into out_dir for each type, with a Modelfile beside it. Quantized types
    start from `source16`, else from the 16-bit file written here (a temporary bf16 when none is listed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for q in [q for q in types if q in DIRECT_TYPES] + [q for q in types if q not in DIRECT_TYPES]:
        path = out_dir / f"{meta['name']}-{q}.gguf"
        if q in DIRECT_TYPES:
            convert(model_dir, path, q, **meta)
            source16 = source16 or (path if q in SIXTEEN_BIT else None)
        else:
            if source16 is None:  # quantizing needs a 16-bit source; make one and keep it out of the list
                source16 = convert(model_dir, out_dir / f"{meta['name']}-bf16.gguf.src", "bf16", **meta)
            quantize(source16, path, q, imatrix=matrix.values() if matrix else None)
        write_modelfile(path, system_prompt)
        written.append((path, q))
    for leftover in out_dir.glob("*.gguf.src"):
        leftover.unlink()
    return written


def write_pair(run_dir: Path, out_dir: Path, base_dir: str | Path, base_type: str, meta: dict,
               system_prompt: str | None, matrix=None) -> tuple[Path, Path, str]:
    """(base GGUF, adapter GGUF, type): the run's adapter as a GGUF LoRA (F32: the delta is never
    rounded) and the base model in `base_type`, with a Modelfile that applies one to the other."""
    adapter = convert_lora(run_dir / "adapter", out_dir / f"{run_dir.name}-lora.gguf", base_dir, name=run_dir.name)
    # the run's template: the same as the base's once served (why_no_pair), Qwen3's own is not
    served = cached_tokenizer(run_dir / "merged").chat_template
    base_path, _ = write_types(Path(base_dir), out_dir, [base_type], dict(meta, name="base", chat_template=served),
                               system_prompt, matrix)[0]
    write_modelfile(base_path, system_prompt, adapter=adapter)
    return base_path, adapter, f"{base_type}+lora"


def write_mixes(run_dir: Path, out_dir: Path, plain: dict[str, Path], meta: dict, system_prompt: str | None,
                matrix=None, names: list[str] | None = None) -> list[tuple[Path, str]]:
    """auto's mixed-precision candidates (fasttune.mix; names: which of mix.MIXES, None: all): the
    tensors the fine-tune moved most at a higher type than the rest. plain: quant type -> the file
    written in it (each mix's base type and its higher type)."""
    names = list(mix.MIXES) if names is None else names
    if not names:
        return []
    energy = mix.delta_energy(run_dir / "adapter", run_dir / "merged", matrix.values() if matrix else None)
    written = []
    for name in names:
        path = mix.write(name, energy, plain, out_dir / f"{meta['name']}-{name}.gguf")
        write_modelfile(path, system_prompt)
        written.append((path, name))
    return written


def export_run(run_dir: Path, cfg, quants: list[str], base: str | Path | None = None, lora_gguf: bool = False,
               tolerance: float | None = None) -> Result:
    """Write, measure and (auto) choose a run's GGUF files.

    base: the run's base model directory (rundir.base_dir, checked by rundir.check_base), for the GGUF
    LoRA pair: written when lora_gguf (the base in the first listed type), and with auto as a candidate
    (the base in PAIR_BASE). Without it, auto has no pair candidate and says so in gguf/auto.md."""
    run_dir = Path(run_dir)
    if not quants:  # --quants none
        return Result([])
    listed = [q for q in quants if q != "auto"]
    auto = "auto" in quants
    if auto and not any(q in SIXTEEN_BIT for q in listed):
        listed.insert(0, "bf16")  # auto measures against a 16-bit file
    listed = sorted(listed, key=lambda q: q not in SIXTEEN_BIT)  # the reference first
    quantized = auto or any(q not in DIRECT_TYPES for q in listed)
    matrix = calibrate.for_run(run_dir) if cfg.export.imatrix and quantized else None
    for q in listed:
        check_quant_name(q, calibrated=matrix is not None)

    # Write and measure, each file once, the 16-bit one first (the others' KL is against it): the listed
    # types in gguf/, auto's candidates in gguf/candidates/ (the plain quants, the mixes, the pair), the
    # GGUF LoRA pair in gguf/lora/. The eval prompts are answered where the answers count: by the files
    # kept (the final evaluation reuses them); auto's candidates answer the examples the choice is made
    # on later, in _choose, and only as far as needed.
    gguf_dir, merged = run_dir / "gguf", run_dir / "merged"
    meta = dict(name=run_dir.name, base_model=cfg.model.model, recipe=cfg.recipe)
    prompt = cfg.data.system_prompt
    task = eval_task(run_dir, cfg) if auto or cfg.eval.evaluate else None
    n_eval, tol = len(task.prompts) if task else 0, cfg.export.quant_tolerance if tolerance is None else tolerance
    choice_at, report_at = autoquant.split(n_eval, tol, cfg.train.seed) if auto else ([], [])
    # the reference answers all (it is the choice's baseline and the report's); the other files kept
    # all only for the final evaluation, else like the candidates
    everything = list(range(n_eval))
    kept_at = everything if cfg.eval.evaluate else choice_at

    files = write_types(merged, gguf_dir, listed, meta, prompt, matrix)
    for path, q in files:
        rundir.add_file(run_dir, path, "model", q)
    # screening by KL only when KL decides: when the task does, KL sets the order files are tested in
    kl_decides = auto and not choice_at
    measure_one = measurer(run_dir, cfg, task, drift=files[0][1] in SIXTEEN_BIT, screen=kl_decides)
    measured = [measure_one(p, q, task_at=everything if (p, q) == files[0] else kept_at) for p, q in files]
    candidates, pairs, pair_candidate, not_written = [], [], None, {}
    no_pair = why_no_pair(run_dir, base) if auto else None
    if auto:
        candidates, more, not_written = _write_candidates(run_dir, files, measured, measure_one, meta, prompt, matrix,
                                                          walk=kl_decides)
        measured += more
        if no_pair is None:
            pair_candidate = write_pair(run_dir, gguf_dir / "candidates" / "lora", base, autoquant.PAIR_BASE, meta,
                                        prompt, matrix)
            b, a, q = pair_candidate
            measured.append(measure_one(b, q, adapter=a, task_at=[], fidelity_now=False))
    if lora_gguf:
        base_path, adapter, qtype = write_pair(run_dir, gguf_dir / "lora", base, listed[0], meta, prompt, matrix)
        _keep_pair(run_dir, base_path, adapter, listed[0])
        pairs.append((base_path, adapter, qtype))
        measured.append(measure_one(base_path, qtype, adapter=adapter, task_at=kept_at))
    result = Result(files, {m.row["file"]: m for m in measured}, [(a, b) for b, a, _ in pairs])

    # Choose: auto keeps one candidate in gguf/ (a pair in gguf/lora/) and deletes the rest.
    if auto:
        options = {p.name: (p, q, None) for p, q in files + candidates}  # --lora_gguf's pair is kept, not a candidate
        if pair_candidate:
            b, a, q = pair_candidate
            options[infer.model_name(b, a)] = (b, q, a)
        decision = _choose(run_dir, options, result, task, tol, matrix.source if matrix else None, choice_at,
                           report_at, no_pair=no_pair, not_written=not_written)
        path, qtype, adapter = options[decision["winner"]]
        if (path, adapter, qtype) == pair_candidate:
            kept_base, kept_adapter = (gguf_dir / "lora" / p.name for p in (path, adapter))
            kept_base.parent.mkdir(exist_ok=True)
            for p in (path, adapter, *(p.with_name(f"Modelfile.{p.stem}") for p in (path, adapter))):
                p.replace(kept_base.parent / p.name)
            _keep_pair(run_dir, kept_base, kept_adapter, autoquant.PAIR_BASE)
            result.lora.append((kept_adapter, kept_base))  # the same model name: measured[] still finds it
        elif (path, qtype) in candidates:
            kept = gguf_dir / path.name
            path.replace(kept)
            path.with_name(f"Modelfile.{path.stem}").replace(gguf_dir / f"Modelfile.{kept.stem}")
            rundir.add_file(run_dir, kept, "model", qtype)
            result.files.append((kept, qtype))
        shutil.rmtree(gguf_dir / "candidates", ignore_errors=True)
    kept = {p.name for p, _ in result.files} | {infer.model_name(b, a) for a, b in result.lora}
    _write_report(run_dir, measured, kept)
    return result


def why_no_pair(run_dir: Path, base: str | Path | None) -> str | None:
    """Why auto cannot measure the base + adapter pair on this run (None: it can). The base GGUF is
    converted from the base model, so it must speak the run's chat template, or the pair would be
    scored and served through another prompt than the one trained on."""
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        return "the run has no adapter/"
    if base is None:
        return "the run's base model is not available (export/gguf.py says why)"
    # the base's template as training served it
    if served_template(cached_tokenizer(base).chat_template) != cached_tokenizer(run_dir / "merged").chat_template:
        return "the base model's chat template is not the one the run was trained with"
    return None


def _keep_pair(run_dir: Path, base_path: Path, adapter: Path, base_type: str) -> None:
    rundir.add_file(run_dir, adapter, "lora_adapter")
    rundir.add_file(run_dir, base_path, "lora_base", base_type)


def _choose(run_dir: Path, options: dict[str, tuple[Path, str, Path | None]], result: Result,
            task: measure.Task | None, tolerance: float, calibrated: str | None, choice_at: list[int],
            report_at: list[int], no_pair: str | None, not_written: dict[str, str]) -> dict:
    """auto's decision (fasttune.autoquant) on the measured rows (options: model name -> (path, type,
    adapter)). When the task decides, the candidates answer the choice examples in autoquant.order, and
    none after the first that fails (it ends the test). The winner then answers the eval prompts it
    has not (the final evaluation reuses them) and, a candidate, is compared with the merged model in
    that load; its score on the examples that took no part in the choice goes into gguf/auto.*."""
    measured = result.measured
    q8 = next((m for m in measured.values() if m.row["type"] == measure.YARDSTICK and m.case_kl), None)
    for name in options:
        if q8:
            _with_ratio(measured[name], q8)
    rows = [measured[name].row for name in options]
    choice = None
    if choice_at:
        reference = rows[0]["file"]
        for row in [rows[0]] + autoquant.order(rows):
            path, _, adapter = options[row["file"]]
            measure.answer(path, task, choice_at, into=measured[row["file"]], adapter=adapter)
            scores = [measured[row["file"]].scores[i] for i in choice_at]
            if row["file"] != reference:
                ref_scores = [measured[reference].scores[i] for i in choice_at]
                if not autoquant.within(intervals.paired(scores, ref_scores), tolerance):
                    break
        choice = {name: [m.scores[i] for i in choice_at] for name, m in measured.items()
                  if name in options and m.answers and all(m.answers[i] is not None for i in choice_at)}
    decision = autoquant.choose(rows, tolerance, calibrated, choice, len(task.prompts) if task else 0,
                                no_pair=no_pair, not_written=not_written)
    path, _, adapter = options[decision["winner"]]
    measure.answer(path, task, range(len(task.prompts)) if task else [], into=measured[decision["winner"]],
                   adapter=adapter, fidelity=True)
    if not task:
        return autoquant.report(run_dir, decision, None)
    ref, win = (measured[name].scores for name in (decision["reference"], decision["winner"]))
    return autoquant.report(run_dir, decision, ([ref[i] for i in report_at], [win[i] for i in report_at]))


def eval_task(run_dir: Path, cfg) -> measure.Task | None:
    """The run's eval examples as prompts and references for measure (None without eval data)."""
    examples = rundir.examples(run_dir, "eval")
    return measure.make_task(run_dir / "merged", examples, cfg.eval.metric, cfg.eval.tolerance,
                             cfg.eval.max_new_tokens) if examples else None


def measurer(run_dir: Path, cfg, task: measure.Task | None, drift: bool, screen: bool) -> measure.Measurer:
    """measure.Measurer on the run's own data: fidelity and drift on its training answers (the eval
    examples stay out of anything a choice is made on). drift: the first file measured is 16-bit, the
    others' KL is against it; screen: a file's KL pass stops once autoquant's budget is settled for it."""
    # measure.cases takes them in this order up to MAX_POSITIONS answer positions; a drift pass that
    # stops early reads the first of those
    conversations = [ex.messages for ex in rundir.in_seeded_order(run_dir, "train")]
    return measure.Measurer(run_dir / "merged", conversations, task, fidelity=cfg.export.verify, drift=drift,
                            settled=autoquant.settled if screen else None)


def _write_candidates(run_dir: Path, files: list[tuple[Path, str]], measured: list[measure.Measured],
                      measure_one: measure.Measurer, meta: dict, system_prompt: str | None, matrix,
                      walk: bool) -> tuple[list[tuple[Path, str]], list[measure.Measured], dict[str, str]]:
    """auto's candidates, each written into gguf/candidates/ and measured in turn: (written, their
    measurements, type -> why not written). llama.cpp's ladder goes from the most bits down, then the
    mixes, which raise tensors of the ladder's q4_k_m file. walk (KL decides): the first type that does
    not qualify stops the ladder; no type after it is written (one listed with --quants is measured
    already and stays a candidate), nor a mix whose base type comes after it (autoquant.CANDIDATES)."""
    out_dir, source16 = run_dir / "gguf" / "candidates", files[0][0]
    merged = run_dir / "merged"
    ladder = autoquant.candidates(calibrated=matrix is not None)
    done = {q: (p, m) for (p, q), m in zip(files, measured)}  # a listed type is measured already, and stays a candidate
    written, more, not_written, stopped = [], [], {}, None
    for q in ladder:
        if q not in done:
            if stopped:
                not_written[q] = f"{stopped}, with more bits, does not qualify"
                continue
            path, _ = write_types(merged, out_dir, [q], meta, system_prompt, matrix, source16=source16)[0]
            done[q] = path, measure_one(path, q, task_at=[], fidelity_now=False)
            written.append((path, q))
            more.append(done[q][1])
        m, q8 = done[q][1], done.get(measure.YARDSTICK)
        if walk and not stopped and q8 and not autoquant.kl_verdict(_with_ratio(m, q8[1]).row, q8[1].row)[0]:
            stopped = q
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        return written, more, not_written
    # a mix raises tensors of its base type's file: worth measuring only where the walk reached that type
    reached = [name for name, (base, _, _) in mix.MIXES.items()
               if stopped is None or ladder.index(base) <= ladder.index(stopped)]
    not_written |= {name: f"{stopped}, with more bits, does not qualify" for name in mix.MIXES if name not in reached}
    mixes = write_mixes(run_dir, out_dir, {q: p for q, (p, _) in done.items()}, meta, system_prompt, matrix,
                        names=reached)
    more += [measure_one(path, q, task_at=[], fidelity_now=False) for path, q in mixes]
    return written + mixes, more, not_written


def _with_ratio(m: measure.Measured, q8: measure.Measured) -> measure.Measured:
    """m with its KL / q8_0's (autoquant.ratio_fields) in its row, on the conversations both were measured on."""
    if m.case_kl and q8.case_kl:
        m.row.update(autoquant.ratio_fields(q8.case_kl, m.case_kl))
    return m


def _write_report(run_dir: Path, measured: list[measure.Measured], kept: set[str]) -> None:
    """gguf/report.json: one row per file measured (candidates auto deleted included, marked), the rows
    of files measured by an earlier export that are still there kept."""
    path = run_dir / "gguf" / "report.json"
    earlier = json.loads(path.read_text())["files"] if path.is_file() else []
    rows = [dict(m.row, kept=m.row["file"] in kept) for m in measured]
    names = {row["file"] for row in rows}
    pair = rundir.lora_pair(run_dir)
    listed = {p.name for p, _ in rundir.models(run_dir)} | ({infer.model_name(pair[1], pair[0])} if pair else set())
    rows = [r for r in earlier if r["file"] not in names and r["file"] in listed] + rows
    rundir.write_json(path, {"files": rows})


def load_report(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "gguf" / "report.json"
    return json.loads(path.read_text())["files"] if path.is_file() else []

