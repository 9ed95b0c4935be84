"""Read a dataset in any common shape, validate every record, turn it into chat messages.

This stage owns the user's data. Every problem is reported as `file:line: field: what is wrong`;
with `on_bad_record="error"` all problems are listed before anything is trained, with "skip" the
bad records are returned as rejects (the recipe writes them to rejects.jsonl). Nothing is dropped
without being counted and written out.

Formats (detected from the first record, or named):
  messages           {"messages": [{"role", "content"}, ...]}  (OpenAI / TRL conversational)
  sharegpt           {"conversations": [{"from", "value"}, ...]}
  alpaca             {"instruction", "input"?, "output", "system"?}
  prompt_completion  {"prompt", "completion"}: strings, or message lists (TRL's convention)
  fields             any columns, turned into the user and assistant turns by two format strings;
                     {name} takes a string column, {name:json} any JSON value written as compact JSON
Sources: .jsonl, .json (an array), .csv, .parquet, a `datasets.save_to_disk` directory, or a hub
dataset name (online only).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from fasttune import UserError

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20
# Size limits: a line of a .jsonl file or a CSV cell (read one at a time, so memory holds one of these),
# and a .json array (parsed whole, so it must fit in memory several times over).
MAX_RECORD_BYTES = 64 << 20
MAX_JSON_BYTES = 512 << 20
TOO_LONG_NUMBER = f"invalid JSON: an integer of more than {sys.get_int_max_str_digits()} digits"
TOO_DEEP = "invalid JSON: nested too deeply for Python's JSON reader (about 1,000 levels); a record is a flat object"
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "fields")
ROLES = {"system", "user", "assistant", "tool"}
# ShareGPT speakers as the common exports spell them.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant", "bot": "assistant",
    "tool": "tool", "function_response": "tool", "observation": "tool",
}


@dataclass
class Example:
    """One validated training example: where it came from and its chat messages."""

    source: str  # "file.jsonl:12"
    messages: list[dict]
    record: dict  # the raw record, kept for evaluation (reference fields)


@dataclass
class Reject:
    """A record that was not used, and why. Written to rejects.jsonl."""

    source: str
    reason: str
    record: object = None

    def to_json(self) -> str:
        row = {"source": self.source, "reason": self.reason, "record": self.record}
        try:
            return json.dumps(row, ensure_ascii=False, default=str).encode("utf-8").decode()
        except (UnicodeEncodeError, RecursionError):  # a lone surrogate or a record nested too deeply
            return json.dumps(dict(row, record=None), ensure_ascii=False)


@dataclass
class Loaded:
    examples: list[Example]  # empty when the examples were streamed (data.stream)
    rejects: list[Reject] = field(default_factory=list)
    format: str = ""
    notes: list[str] = field(default_factory=list)  # harmless things fixed on the way (BOM, CRLF, ...)
    records: int = 0  # records read, good and bad
    kept: int = 0  # examples given out
    duplicates: int = 0


class RecordError(Exception):
    """One record is bad; the message names the field and what was expected."""


# --- sources -----------------------------------------------------------------------------------------

def read_records(source: str | Path, split: str = "train", notes: list[str] | None = None) \
        -> Iterator[tuple[str, object]]:
    """(where, record) for every record; `record` is a RecordError for a line that cannot be read.

    A missing file or an unknown file type raises here, at the call, before a record is read: a
    recipe checks its eval file this way before it spends time on the training file.
    """
    notes = [] if notes is None else notes
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if not path.exists():
        if "/" in str(source) and not str(source).startswith((".", "/")) and path.suffix == "":
            return _read_hub(str(source), split)
        raise UserError(f"{source}: no such file")
    readers = {".jsonl": _read_jsonl, ".json": _read_json_array, ".csv": _read_csv}
    if path.suffix in readers:
        return readers[path.suffix](path, notes)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise UserError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .json, .csv or .parquet")


def _bom(path: Path, f, notes: list[str]) -> None:
    """Step over a UTF-8 byte-order mark at the start of an open binary file, with a note."""
    if f.read(3) == b"\xef\xbb\xbf":
        notes.append(f"{path}: starts with a UTF-8 byte-order mark (BOM); ignored it")
    else:
        f.seek(0)


def _lines(path: Path, notes: list[str]) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the newline) for every line of a file, read one at a time: memory
    holds one line, never the file. A line over MAX_RECORD_BYTES is skipped unread: (number, None)."""
    with open(path, "rb") as f:
        _bom(path, f, notes)
        for lineno in itertools.count(1):
            line = f.readline(MAX_RECORD_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass  # the rest of the oversized line, a MiB at a time
                yield lineno, None
                continue
            yield lineno, line.rstrip(b"\n")


def _json(text: str | bytes):
    """json.loads, with every way a JSON text can fail as a RecordError (positions included)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise RecordError(TOO_DEEP) from None
    except ValueError:  # the one other failure: an integer longer than Python reads
        raise RecordError(TOO_LONG_NUMBER) from None


def _read_jsonl(path: Path, notes: list[str]) -> Iterator[tuple[str, object]]:
    blank, crlf = [], 0
    for lineno, line_bytes in _lines(path, notes):
        where = f"{path}:{lineno}"
        if line_bytes is None:
            yield where, RecordError(f"longer than {MAX_RECORD_BYTES >> 20} MiB, the most one record may be; "
                                     "split it (or check the file is really JSON Lines)")
            continue
        if line_bytes.endswith(b"\r"):
            crlf += 1
            line_bytes = line_bytes[:-1]
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            yield where, RecordError(f"not valid UTF-8 (byte 0x{line_bytes[e.start]:02x} at column {e.start + 1}); "
                                     "save the file as UTF-8")
            continue
        if not line.strip():
            blank.append(lineno)
            continue
        try:
            yield where, _json(line)
        except RecordError as e:
            yield where, e
    if crlf:
        notes.append(f"{path}: {crlf} lines end in CRLF (Windows line endings); read them as plain lines")
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (" ..." if len(blank) > 10 else "")
        notes.append(f"{path}: skipped {len(blank)} blank lines (line {shown})")


def _read_json_array(path: Path, notes: list[str]) -> Iterator[tuple[str, object]]:
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:  # one JSON value is parsed whole: memory would hold the file several times
        raise UserError(f"{path}: {size / 2**20:,.0f} MiB in one JSON array, which is read whole (the limit is "
                        f"{MAX_JSON_BYTES >> 20} MiB); write it as .jsonl, one record per line, to stream it")
    with open(path, "rb") as f:
        _bom(path, f, notes)
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    del raw
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{path}: {TOO_DEEP}") from None
    except ValueError:  # the one other failure: an integer longer than Python reads
        raise UserError(f"{path}: {TOO_LONG_NUMBER}") from None
    del text
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, got {_json_type(data)}; "
                        "for one record per line use .jsonl")
    for i, record in enumerate(data):
        yield f"{path}: record {i}", record


def _read_csv(path: Path, notes: list[str]) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as raw:
        _bom(path, raw, notes)
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        reader = csv.DictReader(_bounded_lines(text, path))
        limit = csv.field_size_limit(MAX_RECORD_BYTES)  # csv's own default is 128 KiB per cell
        try:
            start = 2
            while True:
                where = f"{path}:{start}"
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except UnicodeDecodeError:  # decoded ahead in blocks: find the line again
                    raise UserError(_not_utf8(path)) from None
                except csv.Error as e:  # a cell over the limit, a NUL byte: the reader cannot go on
                    hint = f"; a cell may be at most {MAX_RECORD_BYTES >> 20} MiB" if "field limit" in str(e) else ""
                    raise UserError(f"{where}: cannot read this CSV row ({e}){hint}") from None
                start = reader.line_num + 1
                if None in row:  # more cells than header columns
                    yield where, RecordError(f"{len(row) - 1 + len(row[None])} cells but the header has "
                                             f"{len(row) - 1} columns")
                elif any(v is None for v in row.values()):
                    yield where, RecordError(f"fewer cells than the header's {len(row)} columns")
                else:
                    yield where, row
        finally:
            csv.field_size_limit(limit)


def _bounded_lines(text: io.TextIOWrapper, path: Path) -> Iterator[str]:
    """The file's lines for csv, none longer than MAX_RECORD_BYTES characters: csv itself would read a
    line of any length into memory before its cell limit applies."""
    lineno = 0
    while line := text.readline(MAX_RECORD_BYTES + 1):
        lineno += 1
        if len(line) > MAX_RECORD_BYTES:
            raise UserError(f"{path}:{lineno}: a line longer than {MAX_RECORD_BYTES >> 20} MiB, the most one CSV "
                            "row may be; write long texts as .jsonl")
        yield line


def _not_utf8(path: Path) -> str:
    """The error for the first line of `path` that is not UTF-8."""
    for lineno, line in _lines(path, []):
        try:
            (line or b"").decode("utf-8")
        except UnicodeDecodeError as e:
            return f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[e.start]:02x}); save the file as UTF-8"
    return f"{path}: not valid UTF-8; save the file as UTF-8"


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1000)  # a batch at a time, not the table
        i = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{path}: row {i}", record
                i += 1
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a broken file)
        raise UserError(f"{path}: not a readable parquet file ({e})") from None


def _read_saved_dataset(path: Path, split: str) -> Iterator[tuple[str, object]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path}: a directory, but not one written by datasets' save_to_disk") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split '{split}'; it has {', '.join(ds)} (choose with --split)")
        ds = ds[split]
    for i, record in enumerate(ds):
        yield f"{path}: row {i}", record


def _read_hub(name: str, split: str) -> Iterator[tuple[str, object]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split: datasets raises many types
        raise UserError(f"{name}: cannot load this hub dataset (split '{split}'): {e}") from None
    for i, record in enumerate(ds):
        yield f"{name}[{split}]: row {i}", record


# --- formats -----------------------------------------------------------------------------------------

@dataclass
class Templates:
    """What the `fields` format and the system prompt need; set by the recipe or the config."""

    user: str | None = None
    assistant: str | None = None
    system: str | None = None


def detect_format(record: object, templates: Templates) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        if templates.user and templates.assistant:
            return "fields"
        keys = ", ".join(sorted(record)[:8])
    else:
        keys = _json_type(record)
    raise UserError(f"cannot tell the data format from the first record (keys: {keys}); expected messages, "
                    "conversations, instruction+output or prompt+completion, or pass --format "
                    "with --user_template/--assistant_template")


def _check_unicode(record) -> None:
    """Every string in the record (keys too, at any depth) is valid Unicode: JSON's \\ud800-style
    escapes can encode half a surrogate pair, which no tokenizer or file can hold. Iterative, so a
    deep record cannot exhaust Python's stack."""
    stack = [("", record)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
            stack += [(path or "(key)", k) for k in value]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RecordError(f"field '{path}': not valid Unicode (a lone surrogate \\u{ord(value[e.start]):04x} "
                                  f"at character {e.start}); remove it or write the whole character") from None


def _string(value, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(f"field '{name}': expected a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field '{name}': empty string")
    return value


def _require(record: dict, name: str, where: str | None = None):
    """record[name], or a RecordError naming the field (`where` is its full path, if nested)."""
    if name not in record:
        raise RecordError(f"field '{where or name}': missing")
    return record[name]


def _check_messages(messages, name: str) -> list[dict]:
    if not isinstance(messages, list):
        raise RecordError(f"field '{name}': expected a list of messages, got {_json_type(messages)}")
    if not messages:
        raise RecordError(f"field '{name}': empty list")
    out = []
    for i, msg in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise RecordError(f"field '{where}': expected an object with role and content, got {_json_type(msg)}")
        role = _require(msg, "role", f"{where}.role")
        if not isinstance(role, str):
            raise RecordError(f"field '{where}.role': expected a string, got {_json_type(role)}")
        if role not in ROLES:
            raise RecordError(f"field '{where}.role': '{role}' is not one of {', '.join(sorted(ROLES))}")
        content = _require(msg, "content", f"{where}.content")
        if not isinstance(content, str):
            raise RecordError(f"field '{where}.content': expected a string, got {_json_type(content)}")
        if role == "assistant" and not content.strip():
            raise RecordError(f"field '{where}.content': empty assistant turn (nothing to learn)")
        out.append({"role": role, "content": content})
    return out


def _check_conversation(messages: list[dict], name: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"field '{name}': no assistant turn (nothing to learn)")
    if messages[-1]["role"] != "assistant":
        raise RecordError(f"field '{name}': ends on a {messages[-1]['role']} turn; the last message must be "
                          "the assistant's answer")
    return messages


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + messages
    return messages


def from_messages(record: dict, t: Templates) -> list[dict]:
    return _with_system(_check_conversation(_check_messages(_require(record, "messages"), "messages"),
                                            "messages"), t.system)


def from_sharegpt(record: dict, t: Templates) -> list[dict]:
    turns = _require(record, "conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field 'conversations': expected a non-empty list, got {_json_type(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"field '{where}': expected an object with from and value, got {_json_type(turn)}")
        speaker = _require(turn, "from", f"{where}.from")
        if not isinstance(speaker, str):
            raise RecordError(f"field '{where}.from': expected a string, got {_json_type(speaker)}")
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(f"field '{where}.from': '{speaker}' is not a known speaker "
                              f"({', '.join(sorted(SHAREGPT_ROLES))})")
        role = SHAREGPT_ROLES[speaker]
        value = _string(_require(turn, "value", f"{where}.value"), f"{where}.value", allow_empty=role != "assistant")
        messages.append({"role": role, "content": value})
    return _with_system(_check_conversation(_check_messages(messages, "conversations"), "conversations"),
                        record.get("system") or t.system)


def from_alpaca(record: dict, t: Templates) -> list[dict]:
    instruction = _string(_require(record, "instruction"), "instruction")
    extra = record.get("input")
    extra = "" if extra is None else _string(extra, "input", allow_empty=True)
    output = _string(_require(record, "output"), "output")
    system = record.get("system") or t.system
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _with_system(messages, _string(system, "system") if system else None)


def from_prompt_completion(record: dict, t: Templates) -> list[dict]:
    prompt, completion = _require(record, "prompt"), _require(record, "completion")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _string(prompt, "prompt")}]
    else:
        prompt = _check_messages(prompt, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise RecordError("field 'prompt': ends on an assistant turn; the answer belongs in 'completion'")
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": _string(completion, "completion")}]
    else:
        completion = _check_conversation(_check_messages(completion, "completion"), "completion")
    return _with_system(prompt + completion, t.system)


def from_fields(record: dict, t: Templates) -> list[dict]:
    if not (t.user and t.assistant):
        raise UserError("format 'fields' needs --user_template and --assistant_template "
                        "(format strings such as 'Context: {context}')")
    for name, spec in dict.fromkeys(_placeholders(t.user) + _placeholders(t.assistant)):
        value = _require(record, name)
        if spec != "json":
            _string(value, name)
    messages = [{"role": "user", "content": TEMPLATE_FORMATTER.vformat(t.user, (), record)},
                {"role": "assistant", "content": TEMPLATE_FORMATTER.vformat(t.assistant, (), record)}]
    return _with_system(messages, t.system)


class _TemplateFormatter(string.Formatter):
    """str.format plus one spec, {name:json}: the value as compact JSON (for structured answers).

    Written by hand because str.format has no JSON conversion and a JSON column must not become
    Python's repr (single quotes, True/None)."""

    def format_field(self, value, format_spec):
        if format_spec == "json":
            return json.dumps(value, ensure_ascii=False)
        return super().format_field(value, format_spec)


TEMPLATE_FORMATTER = _TemplateFormatter()


CONVERTERS = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "alpaca": from_alpaca,
    "prompt_completion": from_prompt_completion,
    "fields": from_fields,
}


def template_fields(template: str) -> list[str]:
    """The {placeholders} a format string uses, in order."""
    return [name for name, _ in _placeholders(template)]


def _placeholders(template: str) -> list[tuple[str, str]]:
    return [(name, spec) for _, name, spec, _ in string.Formatter().parse(template) if name]


# --- loading -----------------------------------------------------------------------------------------

def load(
    source: str | Path,
    templates: Templates | None = None,
    fmt: str = "auto",
    on_bad_record: str = "error",
    dedupe: bool = False,
    split: str = "train",
) -> Loaded:
    """Read, detect the format, validate and convert every record, into memory.

    on_bad_record="error" raises one UserError listing the problems (first 20 + a count);
    "skip" returns them in Loaded.rejects. Duplicates (same messages) are counted, and removed
    into the rejects when dedupe is set.
    """
    check_policy(on_bad_record)
    loaded = Loaded(examples=[])
    loaded.examples = list(stream(source, loaded, templates, fmt, dedupe, split))
    finish(loaded, source, on_bad_record)
    return loaded


def check_policy(on_bad_record: str) -> None:
    if on_bad_record not in ("error", "skip"):
        raise UserError(f"--on_bad_record {on_bad_record}: choose error or skip")


def stream(source: str | Path, loaded: Loaded, templates: Templates | None = None, fmt: str = "auto",
           dedupe: bool = False, split: str = "train") -> Iterator[Example]:
    """Every usable example of `source`, one at a time as the file is read; the format, rejects, notes
    and counts go into `loaded` (call finish() once the stream is spent). Memory holds one record, the
    rejects, and about 150 bytes per record to find duplicates (a 16-byte digest and where it was)."""
    templates = templates or Templates()
    if fmt != "auto" and fmt not in CONVERTERS:
        raise UserError(f"--format {fmt}: unknown; choose auto or one of {', '.join(FORMATS)}")
    seen: dict[bytes, str] = {}
    for where, record in read_records(source, split, loaded.notes):
        loaded.records += 1
        if isinstance(record, RecordError):
            loaded.rejects.append(Reject(where, str(record)))
            continue
        if not isinstance(record, dict):
            loaded.rejects.append(Reject(where, f"expected a JSON object, got {_json_type(record)}", record))
            continue
        if not loaded.format:
            try:
                loaded.format = detect_format(record, templates) if fmt == "auto" else fmt
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        try:
            _check_unicode(record)
            messages = CONVERTERS[loaded.format](record, templates)
        except RecordError as e:
            loaded.rejects.append(Reject(where, str(e), record))
            continue
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:  # a shape no check foresaw
            loaded.rejects.append(Reject(where, f"cannot read this record ({type(e).__name__}: {e})", record))
            continue
        text = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if key in seen:
            loaded.duplicates += 1
            if dedupe:
                loaded.rejects.append(Reject(where, f"duplicate of {seen[key]} (--dedupe)", record))
                continue
        else:
            seen[key] = where
        loaded.kept += 1
        yield Example(where, messages, record)


def finish(loaded: Loaded, source: str | Path, on_bad_record: str = "error") -> None:
    """After a stream: raise the bad records (on_bad_record="error"), or an empty result; log the notes."""
    bad = [r for r in loaded.rejects if not r.reason.startswith("duplicate of")]
    if bad and on_bad_record == "error":
        raise_problems([f"{r.source}: {r.reason}" for r in bad], skippable=True)
    if loaded.duplicates:
        dedupe = any(r.reason.startswith("duplicate of") for r in loaded.rejects)
        loaded.notes.append(f"{source}: {loaded.duplicates} duplicate records" +
                            (" removed (--dedupe)" if dedupe else " kept (pass --dedupe to remove them)"))
    if not loaded.kept:
        if bad:
            raise UserError(f"{source}: no usable records; all {len(bad)} were rejected (first: "
                            f"{bad[0].source}: {bad[0].reason})")
        raise UserError(f"{source}: no records (the file is empty)")
    for note in loaded.notes:
        logger.warning(note)
    logger.info("%s: %d examples (%s format)%s", source, loaded.kept, loaded.format,
                f", {len(loaded.rejects)} rejected" if loaded.rejects else "")


def held_out(n: int, fraction: float, seed: int) -> set[int]:
    """Which of n examples (by position in the file) are held out for evaluation: a seeded shuffle,
    at least one on each side."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise UserError(f"--eval_fraction {fraction}: {n} examples leave none to train on")
    return set(order[:n_eval])


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def raise_problems(problems: list[str], skippable: bool = False) -> None:
    """Raise one UserError: the first problems, one per line, and how many more there are.

    skippable: the records can be left out with --on_bad_record skip; say so.
    """
    if not problems:
        return
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    lines = shown + ([f"... and {more} more problems"] if more else [])
    if skippable and len(problems) == 1:
        lines[0] += " (fix it, or pass --on_bad_record skip to leave it out)"
    elif skippable:
        lines.append(f"{len(problems)} bad records: fix them, or pass --on_bad_record skip to leave them out "
                     "(they are written to rejects.jsonl)")
    raise UserError("\n".join(lines))
