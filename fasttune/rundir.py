"""The run directory: what a recipe made, listed in RUN_DIR/run.json, the only input after training.

The data stage writes what it kept, exactly as trained and evaluated (data/train.jsonl,
data/eval.jsonl: one {"source", "messages"} per line), and run.json records where it came from
(each source file's path, sha256 and record count), the base model's identity, the seed and the
library versions. Every later stage (merge, calibration, export, measurement, evaluation) reads
the run, never the user's files again, so a run exports and evaluates the same from any directory
after its sources have moved or changed. The files the export writes are listed too, each with its
kind and type: nothing after training guesses what a file is from its name.

    run.json
      layout, created, seed, versions{fasttune, unsloth, transformers, trl, peft, llama_cpp_python}
      base_model{name, path, revision, config_sha256, weights_sha256}
      sources[{role, given, path, sha256, records}]          the user's files, as read
      data{train, eval: {file, examples, sha256}}             what training and evaluation use
      files[{path, kind, type?}]   kind: adapter | merged | model | imatrix | lora_adapter | lora_base
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from fasttune import UserError

logger = logging.getLogger(__name__)

MANIFEST = "run.json"
LAYOUT = 1  # bumped when the layout changes in a way older fasttune runs do not have
KINDS = ("adapter", "merged", "model", "imatrix", "lora_adapter", "lora_base")
PACKAGES = ("fasttune", "unsloth", "transformers", "trl", "peft", "llama_cpp_python", "gguf", "torch")


def sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        if len(files) > 1:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _versions() -> dict:
    out = {}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary name to write `path` under; renamed to `path` when the block ends without an error,
    so a reader (or a kill) never sees half a file. For writers that take a path (savefig)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a reader (or a kill) never leaves half a file."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --- one process per run ------------------------------------------------------------------------------

LOCK = ".lock"
INSPECT = "inspect"  # what --inspect writes into --out before any run exists
# Everything a run writes at its top level: what --overwrite removes (nothing else in the folder).
RUN_CONTENTS = ("run.json", "config.yaml", "data", "data_stats.json", "rejects.jsonl", "metrics.jsonl", "loss.png",
                "checkpoints", "adapter", "adapter.tmp", "adapter.old", "merged", "gguf", "eval")


def is_run(path: Path) -> bool:
    """A fasttune run: its run.json, or (a run from before run.json) a config.yaml fasttune wrote."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return True
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and "recipe" in saved and "quants" in saved


_held: dict[Path, object] = {}  # run directory -> its open lock file, held until the process exits
# What a killed process leaves behind; removed by the next process that takes the lock.
LEFTOVERS = ("**/*.partial", "**/.*.partial", "merged.tmp*", "gguf/candidates", "**/*.gguf.src")


def lock(run_dir: Path) -> None:
    """Hold RUN_DIR/.lock for the rest of this process (an advisory flock, released by the kernel when
    the process ends, however it ends), then remove what an interrupted process left behind. A second
    process on the same run is refused, naming the holder."""
    import fcntl
    import shutil
    import sys

    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    handle = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"{run_dir} is in use by {holder}; wait for it to finish or stop it, then run this "
                        "again") from None
    handle.seek(0)
    handle.truncate()
    command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    handle.write(f"process {os.getpid()} (`{command}`, since "
                 f"{datetime.datetime.now().isoformat(timespec='seconds')})")
    handle.flush()
    _held[run_dir] = handle
    found = sorted({p for pattern in LEFTOVERS for p in run_dir.glob(pattern)})
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if found:
        logger.warning("removed %d leftovers of an interrupted run in %s: %s", len(found), run_dir,
                       ", ".join(str(p.relative_to(run_dir)) for p in found[:5]))


# --- what training wrote ------------------------------------------------------------------------------

def source(role: str, given: str, records: int) -> dict:
    """One user file as read: hashed so that a later --resume can tell it changed (a hub dataset,
    which has no local file, is recorded by name only)."""
    path = Path(given)
    if not path.exists():
        return {"role": role, "given": given, "path": None, "sha256": None, "records": records}
    return {"role": role, "given": given, "path": str(path.resolve()), "sha256": sha256(path), "records": records}


def start(run_dir: Path, sources: list[dict], train, eval_, base: dict, seed: int) -> dict:
    """Write data/train.jsonl, data/eval.jsonl (the kept examples) and run.json; returns the manifest.

    train, eval_: the kept examples (anything with .source and .messages), exactly what training and
    evaluation use (eval_ may be empty).
    """
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    data = {}
    for name, examples in (("train", train), ("eval", eval_)):
        path = run_dir / "data" / f"{name}.jsonl"
        if not examples:
            path.unlink(missing_ok=True)
            continue
        write_jsonl(path, [{"source": ex.source, "messages": ex.messages} for ex in examples])
        data[name] = {"file": f"data/{name}.jsonl", "examples": len(examples), "sha256": sha256(path)}
    manifest = {"layout": LAYOUT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seed": seed, "versions": _versions(), "base_model": base, "sources": sources, "data": data,
                "files": []}
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def load(run_dir: str | Path) -> dict:
    """run.json; a clear refusal for a directory that is not a run, or a run from before run.json."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        if (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir}: made by an older fasttune (no {MANIFEST}: the run does not list its data "
                            "and files); train it again with the same recipe command and --overwrite")
        raise UserError(f"{run_dir}: not a run directory (no {MANIFEST}); pass the --out of a recipe run")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged ({e}); train the run again with --overwrite") from None
    if manifest.get("layout") != LAYOUT:
        raise UserError(f"{path}: layout {manifest.get('layout')}, this fasttune reads layout {LAYOUT}; train the "
                        "run again with --overwrite")
    return manifest


@dataclass(frozen=True)
class Example:
    """One example as the run stored it: where it came from ("file.jsonl:12") and its chat messages."""

    source: str
    messages: list[dict]


def examples(run_dir: str | Path, split: str) -> list[Example]:
    """The run's own train or eval examples, as trained and evaluated; [] when the run has no such
    split. The file is checked against its recorded hash first."""
    run_dir = Path(run_dir)
    entry = load(run_dir)["data"].get(split)
    if entry is None:
        return []
    path = run_dir / entry["file"]
    if not path.is_file():
        raise UserError(f"{path}: missing; the run's {split} data is gone, train the run again with --overwrite")
    if sha256(path) != entry["sha256"]:
        raise UserError(f"{path}: changed since training (sha256 {entry['sha256'][:12]}... then, "
                        f"{sha256(path)[:12]}... now); restore it, or train the run again with --overwrite")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.append(Example(row["source"], row["messages"]))
    return out


def in_seeded_order(run_dir: str | Path, split: str) -> list[Example]:
    """The run's examples of `split` (examples()) shuffled with the run's seed: what the stages after
    training read only a bounded part of (the importance matrix, KL and fidelity) read them so. A
    file sorted by topic would otherwise give those its first topic alone."""
    out = examples(run_dir, split)
    random.Random(load(run_dir)["seed"]).shuffle(out)
    return out


def check_sources(run_dir: Path, sources: list[dict]) -> None:
    """--resume: refuse when a source file differs from the one the run was trained on (before anything
    is written), saying which and how."""
    recorded = {s["role"]: s for s in load(run_dir)["sources"]}
    for now in sources:
        then = recorded.get(now["role"])
        if then is None:
            raise UserError(f"--resume: the run had no --{now['role']}_data... {now['given']} is new; resume with the "
                            "run's own settings or start again with --overwrite")
        if then["sha256"] != now["sha256"] or then["records"] != now["records"]:
            raise UserError(f"--resume: {now['given']} changed since the run started (sha256 {str(then['sha256'])[:12]}"
                            f"... then, {str(now['sha256'])[:12]}... now; {then['records']} records then, "
                            f"{now['records']} now); resume with the original file or start again with --overwrite")


def base_dir(run_dir: Path) -> str:
    """Where the run's base model is: the absolute path recorded at training (so a relative --model
    still works from another directory), else its name as given (a hub name not in the cache)."""
    from fasttune import base_model

    recorded = load(run_dir)["base_model"]
    path = recorded.get("path")
    return path if path and Path(path).exists() else base_model.resolve(recorded["name"])


def check_base(run_dir: Path) -> None:
    """Refuse a base model that is not the one the run was trained on (merge, LoRA export, --resume)."""
    from fasttune import base_model

    problem = base_model.changed(load(run_dir)["base_model"])
    if problem:
        raise UserError(f"{run_dir}: {problem}; use the original base model, or train the run again with --overwrite")


# --- what export wrote --------------------------------------------------------------------------------

def add_file(run_dir: Path, path: Path, kind: str, qtype: str | None = None) -> None:
    """List (or re-list) a file the run holds, by its path relative to the run."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind}")
    run_dir = Path(run_dir)
    manifest = load(run_dir)
    rel = str(Path(path).resolve().relative_to(run_dir.resolve()))
    entry = {"path": rel, "kind": kind, **({"type": qtype} if qtype else {})}
    manifest["files"] = [f for f in manifest["files"] if f["path"] != rel] + [entry]
    write_json(run_dir / MANIFEST, manifest)


def files(run_dir: str | Path, kind: str) -> list[tuple[Path, dict]]:
    """(absolute path, entry) of the run's files of one kind that still exist, in the order written."""
    run_dir = Path(run_dir)
    return [(run_dir / f["path"], f) for f in load(run_dir)["files"]
            if f["kind"] == kind and (run_dir / f["path"]).exists()]


def models(run_dir: str | Path) -> list[tuple[Path, str]]:
    """(GGUF path, quant type) of every model file the run exported, 16-bit first."""
    out = [(path, entry["type"]) for path, entry in files(run_dir, "model")]
    return sorted(out, key=lambda pt: pt[1] not in ("bf16", "f16", "f32"))


def lora_pair(run_dir: str | Path) -> tuple[Path, Path] | None:
    """(adapter GGUF, base GGUF) when the run exported its adapter as a GGUF LoRA."""
    adapters, bases = files(run_dir, "lora_adapter"), files(run_dir, "lora_base")
    return (adapters[-1][0], bases[-1][0]) if adapters and bases else None
