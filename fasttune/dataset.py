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
from collections.abc import Callable, Iterator
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


# Examples tokenized at once: enough to keep every core busy (chat.PARALLEL_MIN), bounded in characters so
# that a chunk of very long records stays small.
CHUNK_EXAMPLES, CHUNK_CHARS = 8000, 16 << 20


def _chunks(examples: Iterator[data.Example]) -> Iterator[list[data.Example]]:
    chunk, size = [], 0
    for ex in examples:
        chunk.append(ex)
        size += sum(len(m["content"]) for m in ex.messages)
        if len(chunk) >= CHUNK_EXAMPLES or size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _until_bad(examples: Iterator[data.Example], loaded: data.Loaded, on_bad_record: str) \
        -> Iterator[data.Example]:
    """The examples, until a bad record turns up when on_bad_record="error": the run stops then, so
    nothing more is tokenized; the rest of the file is still read, for the error to list every one."""
    seen = 0
    for ex in examples:
        if on_bad_record == "error":
            if any(not r.reason.startswith("duplicate of") for r in loaded.rejects[seen:]):
                break
            seen = len(loaded.rejects)
        yield ex
    for _ in examples:
        pass


def _at(examples: Iterator[data.Example], positions: set[int], inside: bool) -> Iterator[data.Example]:
    """The examples whose position in the file is (inside=True) or is not in `positions`."""
    return (ex for i, ex in enumerate(examples) if (i in positions) == inside)


def build(cfg: Config, tokenizer, hold: int | None = None,
          check_eval: Callable[[list[data.Example]], None] | None = None) -> TrainingData:
    """Load, validate, split and tokenize the training (and eval) data as training will see it.

    The files are read as a stream, a chunk of examples at a time. hold: how many prepared examples
    of each split stay in memory (None: all, as training needs; --inspect holds the few it shows, so
    its memory grows with the longest record, not the file). check_eval sees every eval example that
    is kept. With --eval_fraction the file is read three times (count, train side, eval side) instead
    of held; both sides keep the file's order.
    """
    d, max_len = cfg.data, cfg.model.max_seq_length
    templates = data.Templates(d.user_template, d.assistant_template, d.system_prompt)
    data.check_policy(d.on_bad_record)
    for source in filter(None, (d.data, d.eval_data)):
        data.read_records(source, d.split)  # no such file, unknown type: now, not after the train file is tokenized

    def read(source):
        loaded = data.Loaded(examples=[])
        return loaded, data.stream(source, loaded, templates, d.format, d.dedupe, d.split)

    def prepare(loaded, examples, check=None):
        return chat.prepare_chunks(_chunks(_until_bad(examples, loaded, d.on_bad_record)), tokenizer, max_len,
                                   d.truncation, d.train_on, d.special_tokens_in_text, hold, check)

    def done(loaded, source, prepared):  # bad records first, then "nothing left"
        data.finish(loaded, source, d.on_bad_record)
        return chat.require_examples(prepared)

    train_loaded, examples = read(d.data)
    eval_split = None
    if d.eval_fraction and not d.eval_data:
        n = sum(1 for _ in examples)  # first pass: validate and count, nothing held
        data.finish(train_loaded, d.data, d.on_bad_record)
        eval_at = data.held_out(n, d.eval_fraction, cfg.train.seed)
        again, examples = read(d.data)
        train = Split(train_loaded, chat.require_examples(prepare(again, _at(examples, eval_at, inside=False))))
        again, examples = read(d.data)
        eval_split = Split(None, chat.require_examples(prepare(again, _at(examples, eval_at, inside=True),
                                                               check_eval)))
    else:
        train = Split(train_loaded, done(train_loaded, d.data, prepare(train_loaded, examples)))
    sources = [rundir.source("train", d.data, train_loaded.records)]  # records: counted once the file is read
    if d.eval_data:
        eval_loaded, examples = read(d.eval_data)
        eval_split = Split(eval_loaded, done(eval_loaded, d.eval_data, prepare(eval_loaded, examples, check_eval)))
        sources.append(rundir.source("eval", d.eval_data, eval_loaded.records))
    result = TrainingData(train, eval_split, sources)
    for line in result.summary().splitlines():
        logger.info(line)
    return result
