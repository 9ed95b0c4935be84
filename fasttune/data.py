"""Read a dataset file, validate every record, and turn it into chat messages.

This stage owns the user's data: every problem is reported as `file:line: field 'x': what is
wrong`, all problems are collected before anything is trained, and nothing is dropped silently.

Formats so far: `fields` (any columns turned into a user and an assistant turn by two format
strings, as the clinical QA recipe does). Input: JSON Lines.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path

from fasttune import UserError

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20


@dataclass
class Example:
    """One validated training example: where it came from and its chat messages."""

    source: str  # "file.jsonl:12"
    messages: list[dict]
    record: dict  # the raw record, kept for evaluation (reference fields)


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; raises UserError listing every bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    records, problems = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{lineno}: not valid UTF-8 (byte {e.start}); save the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # so the column points into this line
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{lineno}: expected a JSON object, got {_json_type(obj)}")
                continue
            records.append((lineno, obj))
    raise_problems(problems)
    if not records:
        raise UserError(f"{path}: no records (the file is empty); expected one JSON object per line")
    return records


def template_fields(template: str) -> list[str]:
    """The {placeholders} a format string uses, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def load_fields(
    path: str | Path,
    user_template: str,
    assistant_template: str,
    system_prompt: str | None = None,
) -> list[Example]:
    """Records with named columns -> single-turn chats, via two format strings.

    Every placeholder must be present in every record as a non-empty string; all problems in the
    file are reported together.
    """
    path = Path(path)
    needed = template_fields(user_template) + template_fields(assistant_template)
    examples, problems = [], []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        bad = [_field_problem(where, name, record) for name in dict.fromkeys(needed)]
        bad = [b for b in bad if b]
        if bad:
            problems.extend(bad)
            continue
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_template.format_map(record)})
        messages.append({"role": "assistant", "content": assistant_template.format_map(record)})
        examples.append(Example(where, messages, record))
    raise_problems(problems)
    logger.info("%s: %d examples", path, len(examples))
    return examples


def _field_problem(where: str, name: str, record: dict) -> str | None:
    if name not in record:
        return f"{where}: field '{name}': missing (expected a string)"
    value = record[name]
    if not isinstance(value, str):
        return f"{where}: field '{name}': expected a string, got {_json_type(value)}"
    if not value.strip():
        return f"{where}: field '{name}': empty string"
    return None


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def raise_problems(problems: list[str]) -> None:
    """Raise one UserError listing the first problems, one per line, and how many more there are."""
    if not problems:
        return
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = [f"... and {more} more problems"] if more else []
    raise UserError("\n".join(shown + tail))
