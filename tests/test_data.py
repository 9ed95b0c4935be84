"""Reading and validating the recipe's data: every problem names file, line and field."""

import json

import pytest

from fasttune import UserError
from fasttune.data import load_fields, read_jsonl, template_fields

USER = "Context: {context}\n\nQuestions: {questions}"
ASSISTANT = "Answers: {answers}"


def write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def good(**over):
    return json.dumps({"context": "c", "questions": "q", "answers": "a", **over})


def test_fields_become_a_chat(tmp_path):
    path = write(tmp_path, [good(context="Man, 60.", extra=1)])
    [ex] = load_fields(path, USER, ASSISTANT, system_prompt="Be brief.")
    assert ex.source == f"{path}:1"
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Context: Man, 60.\n\nQuestions: q"},
        {"role": "assistant", "content": "Answers: a"},
    ]


def test_template_fields():
    assert template_fields(USER) == ["context", "questions"]


@pytest.mark.parametrize("lines, message", [
    ([good(), json.dumps({"context": "c", "answers": "a"})], r"d\.jsonl:2: field 'questions': missing"),
    ([good(context=3)], r"d\.jsonl:1: field 'context': expected a string, got number"),
    ([good(answers=None)], r"d\.jsonl:1: field 'answers': expected a string, got null"),
    ([good(answers="  ")], r"d\.jsonl:1: field 'answers': empty string"),
    ([good(), good(), '{"context": "c",'], r"d\.jsonl:3: invalid JSON: .* \(column \d+\)"),
    (["[1, 2]"], r"d\.jsonl:1: expected a JSON object, got array"),
    ([], r"d\.jsonl: no records \(the file is empty\)"),
])
def test_bad_records(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        load_fields(write(tmp_path, lines), USER, ASSISTANT)


def test_all_problems_listed_with_a_count(tmp_path):
    lines = [json.dumps({"context": "c"}) for _ in range(30)]
    with pytest.raises(UserError) as err:
        load_fields(write(tmp_path, lines), USER, ASSISTANT)
    shown = str(err.value).splitlines()
    assert len(shown) == 21 and shown[-1] == "... and 40 more problems"  # 2 missing fields x 30 records


def test_non_utf8_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(good().encode() + b"\n" + b'{"context": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
