"""The export stage of a run: merged model -> GGUF files, each measured once, each listed in run.json.

    write     the listed types (bf16/f16/f32/q8_0 by fasttune.convert, the rest by llama.cpp from the
              16-bit file, calibrated by the run's importance matrix), `auto`'s candidates in
              gguf/candidates/, the GGUF LoRA pair, a Modelfile beside every model file
    measure   every file once (fasttune.measure), on the run's own data
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

from fasttune import UserError, autoquant, calibrate, measure, rundir
from fasttune.convert import DIRECT_TYPES, convert
from fasttune.lora_gguf import convert_lora
from fasttune.modelfile import write_modelfile
from fasttune.quantize import check_quant_name, quantize

logger = logging.getLogger(__name__)

SIXTEEN_BIT = ("bf16", "f16", "f32")


@dataclass
class Result:
    files: list[tuple[Path, str]]  # the model files kept, (path, quant type), the 16-bit reference first
    measured: dict[str, measure.Measured] = field(default_factory=dict)  # file name -> its measurement
    lora: tuple[Path, Path] | None = None  # (adapter GGUF, base GGUF)


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


def export_run(run_dir: Path, cfg, quants: list[str], lora_base: str | None = None,
               tolerance: float | None = None) -> Result:
    """Write, measure and (auto) choose a run's GGUF files. lora_base: the base model's directory, to
    also write the adapter as a GGUF LoRA with a GGUF of the base."""
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

    # Write: the listed types into gguf/, auto's candidates beside them in gguf/candidates/.
    gguf_dir, merged = run_dir / "gguf", run_dir / "merged"
    meta = dict(name=run_dir.name, base_model=cfg.model.model, recipe=cfg.recipe)
    files = write_types(merged, gguf_dir, listed, meta, cfg.data.system_prompt, matrix)
    for path, q in files:
        rundir.add_file(run_dir, path, "model", q)
    reference = next((pq for pq in files if pq[1] in SIXTEEN_BIT), None)
    candidates = []
    if auto:
        todo = [q for q in autoquant.candidates(calibrated=matrix is not None) if q not in listed]
        candidates = write_types(merged, gguf_dir / "candidates", todo, meta, cfg.data.system_prompt, matrix,
                                 source16=reference[0])
    lora = None
    if lora_base:
        adapter = convert_lora(run_dir / "adapter", gguf_dir / "lora" / f"{run_dir.name}-lora.gguf", lora_base,
                               name=run_dir.name)
        base_path, base_type = write_types(Path(lora_base), gguf_dir / "lora", listed[:1],
                                           dict(meta, name="base"), cfg.data.system_prompt)[0]
        write_modelfile(base_path, cfg.data.system_prompt, adapter=adapter)
        rundir.add_file(run_dir, adapter, "lora_adapter")
        rundir.add_file(run_dir, base_path, "lora_base", base_type)
        lora = (adapter, base_path)

    # Measure: every file once, the 16-bit one first (the others' KL is against it). The eval prompts
    # are answered where the answers count: by the files kept (the final evaluation reuses them) and,
    # with auto, by the candidates on the examples the choice is made on, if the set can resolve it.
    task = eval_task(run_dir, cfg) if auto or cfg.eval.evaluate else None
    n_eval, tol = len(task.prompts) if task else 0, cfg.export.quant_tolerance if tolerance is None else tolerance
    choice_at, report_at = autoquant.split(n_eval, tol, cfg.train.seed) if auto else ([], [])
    # the reference answers all (it is the choice's baseline and the report's); the other listed files
    # all only for the final evaluation, else like the candidates
    everything = list(range(n_eval))
    answer_at = {p.name: everything if cfg.eval.evaluate or (p, q) == files[0] else choice_at for p, q in files}
    answer_at |= {p.name: choice_at for p, _ in candidates}
    measured = measure_run(run_dir, cfg, files + candidates, lora, task, answer_at)
    result = Result(files, {m.row["file"]: m for m in measured}, lora)

    # Choose: auto keeps one candidate in gguf/ and deletes the rest.
    if auto:
        decision = _choose(run_dir, files + candidates, result, task, tol, matrix.source if matrix else None,
                           choice_at, report_at)
        chosen = next(pq for pq in files + candidates if pq[0].name == decision["winner"])
        if chosen in candidates:
            kept = gguf_dir / chosen[0].name
            chosen[0].replace(kept)
            (gguf_dir / "candidates" / f"Modelfile.{chosen[0].stem}").replace(gguf_dir / f"Modelfile.{kept.stem}")
            rundir.add_file(run_dir, kept, "model", chosen[1])
            result.files.append((kept, chosen[1]))
        shutil.rmtree(gguf_dir / "candidates", ignore_errors=True)
    _write_report(run_dir, measured, kept={p.name for p, _ in result.files})
    return result


def _choose(run_dir: Path, files: list[tuple[Path, str]], result: Result, task: measure.Task | None,
            tolerance: float, calibrated: str | None, choice_at: list[int], report_at: list[int]) -> dict:
    """auto's decision (fasttune.autoquant) on the measured rows; the winner then answers the eval
    prompts it has not (the final evaluation reuses them), and its score on the examples that took no
    part in the choice goes into gguf/auto.*."""
    measured = result.measured
    choice = {p.name: [measured[p.name].scores[i] for i in choice_at] for p, _ in files} if choice_at else None
    decision = autoquant.choose([measured[p.name].row for p, _ in files], tolerance, calibrated, choice,
                                len(task.prompts) if task else 0)
    if not task:
        return autoquant.report(run_dir, decision, None)
    winner = next(p for p, _ in files if p.name == decision["winner"])
    measure.answer(winner, task, range(len(task.prompts)), into=measured[winner.name])
    ref, win = (measured[name].scores for name in (decision["reference"], decision["winner"]))
    return autoquant.report(run_dir, decision, ([ref[i] for i in report_at], [win[i] for i in report_at]))


def eval_task(run_dir: Path, cfg) -> measure.Task | None:
    """The run's eval examples as prompts and references for measure (None without eval data)."""
    examples = rundir.examples(run_dir, "eval")
    return measure.make_task(run_dir / "merged", examples, cfg.eval.metric, cfg.eval.tolerance,
                             cfg.eval.max_new_tokens) if examples else None


def measure_run(run_dir: Path, cfg, files: list[tuple[Path, str]], lora: tuple[Path, Path] | None,
                task: measure.Task | None, answer_at: dict[str, list[int]]) -> list[measure.Measured]:
    """measure.measure on the run's own data: fidelity and drift on its training answers (the eval
    examples stay out of anything a choice is made on); answer_at: which eval prompts each file answers."""
    # at most one answer position per conversation counts towards MAX_POSITIONS: no more are read
    conversations = [ex.messages for ex in rundir.examples(run_dir, "train", limit=measure.MAX_POSITIONS)]
    return measure.measure(run_dir / "merged", files, conversations, task, fidelity=cfg.export.verify, lora=lora,
                           drift=bool(files) and files[0][1] in SIXTEEN_BIT, task_at=answer_at)


def _write_report(run_dir: Path, measured: list[measure.Measured], kept: set[str]) -> None:
    """gguf/report.json: one row per file measured (candidates auto deleted included, marked), the rows
    of files measured by an earlier export that are still there kept."""
    path = run_dir / "gguf" / "report.json"
    earlier = json.loads(path.read_text())["files"] if path.is_file() else []
    rows = [dict(m.row, kept=m.row["file"] in kept or m.row["type"] == "lora") for m in measured]
    names = {row["file"] for row in rows}
    listed = {p.name for p, _ in rundir.models(run_dir)}
    rows = [r for r in earlier if r["file"] not in names and r["file"] in listed] + rows
    rundir.write_json(path, {"files": rows})


def load_report(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "gguf" / "report.json"
    return json.loads(path.read_text())["files"] if path.is_file() else []

