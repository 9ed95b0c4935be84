"""The data stage as a recipe runs it: read and validate (data.py), tokenize and mask (chat.py),
split off an eval set, count everything, and write what was left out.

Everything a person needs to trust the data ends up in the run directory: data/train.jsonl and
data/eval.jsonl (exactly what is trained and evaluated, which every later stage reads),
data_stats.json (the same summary `--inspect` prints) and rejects.jsonl (every record not trained
on, with the reason).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fasttune import chat, data, rundir
from fasttune.config import Config

logger = logging.getLogger(__name__)


@dataclass
class Split:
    loaded: data.Loaded | None  # None when split off another file's records
    prepared: chat.Prepared


@dataclass
class TrainingData:
    train: Split
    eval: Split | None
    sources: list[dict] = field(default_factory=list)  # each user file as read: rundir.source()

    @property
    def rejects(self) -> list[data.Reject]:
        out = []
        for split in (self.train, self.eval):
            if split:
                out += (split.loaded.rejects if split.loaded else []) + split.prepared.rejects
        return out

    def stats(self) -> dict:
        out = {}
        for name, split in (("train", self.train), ("eval", self.eval)):
            if split:
                out[name] = dict(split.prepared.stats)
                if split.loaded:
                    out[name].update(format=split.loaded.format, rejected_records=len(split.loaded.rejects),
                                     notes=split.loaded.notes)
        return out

    def summary(self) -> str:
        lines = []
        for name, s in self.stats().items():
            p = s["length_percentiles"]
            lines.append(
                f"{name}: {s['kept']} of {s['records']} examples kept, {s['tokens']} tokens, "
                f"{s['trained_tokens']} trained ({100 * s['trained_fraction']:.1f}%); "
                f"length p50 {p['p50']} / p90 {p['p90']} / max {p['max']} tokens; "
                f"{s['answers_cut']} answers longer than {s['max_length']} ({s['truncation']}), "
                f"{s['nothing_trained']} with nothing to train, {s.get('rejected_records', 0)} bad records skipped")
        return "\n".join(lines)

    def save(self, run_dir: Path, base: dict, seed: int) -> None:
        """data/train.jsonl, data/eval.jsonl and run.json (fasttune.rundir); data_stats.json, rejects.jsonl."""
        rundir.start(run_dir, self.sources, self.train.prepared.kept, self.eval.prepared.kept if self.eval else [],
                     base, seed)
        self.save_stats(run_dir)

    def save_stats(self, folder: Path) -> None:
        """data_stats.json and rejects.jsonl (what --inspect writes too)."""
        rundir.write_json(folder / "data_stats.json", self.stats())
        rejects = self.rejects
        path = folder / "rejects.jsonl"
        path.unlink(missing_ok=True)
        if rejects:
            rundir.write_text(path, "".join(r.to_json() + "\n" for r in rejects))
            logger.warning("%d records not trained on; reasons in %s", len(rejects), path)


def build(cfg: Config, tokenizer) -> TrainingData:
    """Load, validate, split and tokenize the training (and eval) data as training will see it."""
    d, max_len = cfg.data, cfg.model.max_seq_length
    templates = data.Templates(d.user_template, d.assistant_template, d.system_prompt)
    load = lambda source: data.load(source, templates, d.format, d.on_bad_record, d.dedupe, d.split)  # noqa: E731
    prepare = lambda examples: chat.prepare(examples, tokenizer, max_len, d.truncation, d.train_on,  # noqa: E731
                                                 d.special_tokens_in_text)

    records = lambda loaded: len(loaded.examples) + len(loaded.rejects)  # noqa: E731
    train_loaded = load(d.data)
    sources = [rundir.source("train", d.data, records(train_loaded))]
    eval_split = None
    if d.eval_data:
        eval_loaded = load(d.eval_data)
        sources.append(rundir.source("eval", d.eval_data, records(eval_loaded)))
        eval_split = Split(eval_loaded, prepare(eval_loaded.examples))
        train_examples = train_loaded.examples
    elif d.eval_fraction:
        train_examples, held_out = data.split_off(train_loaded, d.eval_fraction, cfg.train.seed)
        eval_split = Split(None, prepare(held_out))
    else:
        train_examples = train_loaded.examples
    result = TrainingData(Split(train_loaded, prepare(train_examples)), eval_split, sources)
    for line in result.summary().splitlines():
        logger.info(line)
    return result
