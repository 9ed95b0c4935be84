"""Reading and validating data: every format, every source, and a precise message for every fault."""

import json

import pytest

from fasttune import UserError
from fasttune.data import Templates, load, template_fields

BAD = __import__("pathlib").Path(__file__).parent / "data" / "bad"
SKIP_HINT = " (fix it, or pass --on_bad_record skip to leave it out)"

# file in tests/data/bad -> the first line of the error, after the file's path
BAD_CASES = {
    "invalid_json.jsonl": ":2: invalid JSON: Expecting value (column 15)",
    "not_an_object.jsonl": ":1: expected a JSON object, got array",
    "empty.jsonl": ": no records (the file is empty)",
    "only_blank_lines.jsonl": ": no records (the file is empty)",
    "non_utf8.jsonl": ":2: not valid UTF-8 (byte 0xe9 at column 47); save the file as UTF-8",
    "messages_not_a_list.jsonl": ":1: field 'messages': expected a list of messages, got string",
    "messages_empty.jsonl": ":1: field 'messages': empty list",
    "message_not_an_object.jsonl": ":1: field 'messages[0]': expected an object with role and content, got string",
    "message_missing_role.jsonl": ":1: field 'messages[0].role': missing",
    "message_unknown_role.jsonl": ":1: field 'messages[1].role': 'bot' is not one of assistant, system, tool, user",
    "message_missing_content.jsonl": ":1: field 'messages[1].content': missing",
    "message_content_not_string.jsonl": ":1: field 'messages[1].content': expected a string, got number",
    "empty_assistant_turn.jsonl": ":1: field 'messages[1].content': empty assistant turn (nothing to learn)",
    "ends_on_user_turn.jsonl": ":1: field 'messages': ends on a user turn; the last message must be the "
                               "assistant's answer",
    "no_assistant_turn.jsonl": ":1: field 'messages': no assistant turn (nothing to learn)",
    "sharegpt_unknown_speaker.jsonl": ":1: field 'conversations[1].from': 'alien' is not a known speaker "
                                      "(assistant, bard, bing, bot, chatgpt, function_response, gpt, human, model, "
                                      "observation, system, tool, user)",
    "sharegpt_not_a_list.jsonl": ":1: field 'conversations': expected a non-empty list, got object",
    "sharegpt_missing_value.jsonl": ":1: field 'conversations[1].value': missing",
    "alpaca_missing_output.jsonl": ":2: field 'output': missing",
    "alpaca_input_not_string.jsonl": ":1: field 'input': expected a string, got array",
    "completion_empty.jsonl": ":1: field 'completion': empty string",
    "prompt_ends_on_assistant.jsonl": ":1: field 'prompt': ends on an assistant turn; the answer belongs in "
                                      "'completion'",
    "json_not_an_array.json": ": expected a JSON array of records, got object; for one record per line use .jsonl",
    "json_invalid.json": ":3: invalid JSON: Expecting property name enclosed in double quotes (column 4)",
    "json_bad_record.json": ": record 1: field 'messages': empty list",
    "csv_ragged_row.csv": ":3: 3 cells but the header has 2 columns",
    "csv_short_row.csv": ":3: fewer cells than the header's 3 columns",
    "csv_empty_output.csv": ":2: field 'output': empty string",
    "unknown_extension.txt": ": unknown file type '.txt'; use .jsonl, .json, .csv or .parquet",
    "many_bad_records.jsonl": ":1: field 'messages': empty list",
    # wrong JSON types anywhere, invalid Unicode, nesting no reader takes
    "message_role_not_string.jsonl": ":1: field 'messages[0].role': expected a string, got array",
    "sharegpt_from_not_string.jsonl": ":1: field 'conversations[0].from': expected a string, got number",
    "alpaca_instruction_null.jsonl": ":1: field 'instruction': expected a string, got null",
    "completion_message_not_an_object.jsonl": ":1: field 'completion[0]': expected an object with role and "
                                              "content, got array",
    "lone_surrogate.jsonl": ":1: field 'messages[0].content': not valid Unicode (a lone surrogate \\ud800 at "
                            "character 3); remove it or write the whole character",
    "deeply_nested.jsonl": ":1: invalid JSON: nested too deeply for Python's JSON reader (about 1,000 levels); "
                           "a record is a flat object",
    # size limits (the line, cell and file limits: test_size_limits_are_one_line below)
    "integer_too_long.jsonl": ":1: invalid JSON: an integer of more than 4300 digits",
    "json_integer_too_long.json": ": invalid JSON: an integer of more than 4300 digits",
    "csv_not_utf8.csv": ":3: not valid UTF-8 (byte 0xe9); save the file as UTF-8",
}


def test_the_bad_corpus_is_complete():
    assert len(BAD_CASES) >= 25
    assert {p.name for p in BAD.iterdir()} == set(BAD_CASES) | {"unknown_format.jsonl", "broken.parquet"}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_file(name):
    path = BAD / name
    with pytest.raises(UserError) as err:
        load(path)
    first = str(err.value).splitlines()[0].removesuffix(SKIP_HINT)
    assert first == f"{path}{BAD_CASES[name]}"


def test_unknown_format_names_the_file_the_keys_and_the_way_out():
    with pytest.raises(UserError, match=r"unknown_format.jsonl:1: cannot tell the data format from the first record \(keys: answer, "
                                        r"question\); .* pass --format"):
        load(BAD / "unknown_format.jsonl")


def test_broken_parquet():
    with pytest.raises(UserError, match=r"broken.parquet: not a readable parquet file"):
        load(BAD / "broken.parquet")


def test_many_problems_are_listed_with_a_count_and_the_way_out():
    with pytest.raises(UserError) as err:
        load(BAD / "many_bad_records.jsonl")
    lines = str(err.value).splitlines()
    assert len(lines) == 22
    assert lines[20] == "... and 10 more problems"
    assert lines[21].startswith("30 bad records: fix them, or pass --on_bad_record skip")


def test_skip_keeps_the_good_records_and_returns_the_bad_with_reasons(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path.write_text(json.dumps(good) + "\n" + '{"messages": []}\n' + "not json\n" + json.dumps(good) + "\n")
    loaded = load(path, on_bad_record="skip")
    assert [e.source for e in loaded.examples] == [f"{path}:1", f"{path}:4"]
    assert [(r.source, r.reason) for r in loaded.rejects] == [
        (f"{path}:2", "field 'messages': empty list"),
        (f"{path}:3", "invalid JSON: Expecting value (column 1)"),
    ]
    assert json.loads(loaded.rejects[0].to_json())["record"] == {"messages": []}
    assert any("duplicate" in note for note in loaded.notes)  # 1 and 4 are the same; counted, kept


def test_dedupe_removes_duplicates_into_the_rejects(tmp_path):
    path = tmp_path / "dup.jsonl"
    rec = json.dumps({"instruction": "Say hi", "output": "Hi"})
    path.write_text(f"{rec}\n{rec}\n{rec}\n")
    loaded = load(path, dedupe=True)
    assert len(loaded.examples) == 1
    assert [r.reason for r in loaded.rejects] == [f"duplicate of {path}:1 (--dedupe)"] * 2


def test_bom_crlf_and_blank_lines_are_read_and_reported(tmp_path):
    path = tmp_path / "windows.jsonl"
    rec = json.dumps({"prompt": "Hi", "completion": "Hello."})
    path.write_bytes(b"\xef\xbb\xbf" + f"{rec}\r\n\r\n{rec.replace('Hi', 'Hey')}\r\n".encode())
    loaded = load(path)
    assert len(loaded.examples) == 2 and loaded.format == "prompt_completion"
    notes = "\n".join(loaded.notes)
    assert "byte-order mark (BOM); ignored it" in notes
    assert "3 lines end in CRLF" in notes
    assert "skipped 1 blank lines (line 2)" in notes


# --- every format becomes the same chat ------------------------------------------------------------

WANT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}]

FORMS = {
    "messages": {"messages": WANT},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                   {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]},
    "alpaca": {"instruction": "Capital of France?", "input": "", "output": "Paris.", "system": "Be brief."},
    "prompt_completion": {"prompt": [WANT[0], WANT[1]], "completion": [WANT[2]]},
}


@pytest.mark.parametrize("fmt", sorted(FORMS))
def test_formats_detected_and_converted(tmp_path, fmt):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(FORMS[fmt]) + "\n")
    loaded = load(path)
    assert loaded.format == fmt and loaded.examples[0].messages == WANT


def test_alpaca_input_and_prompt_completion_strings(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Translate", "input": "chat", "output": "cat"}) + "\n")
    assert load(path).examples[0].messages[0] == {"role": "user", "content": "Translate\n\nchat"}
    path.write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    assert load(path, Templates(system="S")).examples[0].messages == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_fields_format(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"context": "Man, 60.", "answers": "MI", "extra": 1}) + "\n"
                    + json.dumps({"context": 3, "answers": "x"}) + "\n")
    t = Templates("Context: {context}", "Answers: {answers}", "Be brief.")
    with pytest.raises(UserError, match=r"f\.jsonl:2: field 'context': expected a string, got number"):
        load(path, t, fmt="fields")
    [ex] = load(path, t, fmt="fields", on_bad_record="skip").examples
    assert ex.messages[1:] == [{"role": "user", "content": "Context: Man, 60."},
                               {"role": "assistant", "content": "Answers: MI"}]
    assert template_fields(t.user) == ["context"]


def test_fields_json_spec_writes_structured_values_as_json(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"note": "Amoxicillin 500 mg.", "out": {"drug": "amoxicillin", "dose_mg": 500,
                                                                      "flags": ["ß", None]}}) + "\n")
    t = Templates("Note: {note}", "{out:json}")
    [ex] = load(path, t, fmt="fields").examples
    assert ex.messages[-1]["content"] == '{"drug": "amoxicillin", "dose_mg": 500, "flags": ["ß", null]}'
    with pytest.raises(UserError, match="field 'out': expected a string, got object"):
        load(path, Templates("Note: {note}", "{out}"), fmt="fields")


def test_sources_json_csv_parquet_and_saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    records = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ("hi", "bye", "yes")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.csv").write_text("instruction,input,output\n" + "".join(
        f"{r['instruction']},,{r['output']}\n" for r in records))
    Dataset.from_list(records).to_parquet(tmp_path / "d.parquet")
    DatasetDict({"train": Dataset.from_list(records)}).save_to_disk(tmp_path / "saved")
    for source in ("d.json", "d.csv", "d.parquet", "saved"):
        loaded = load(tmp_path / source)
        assert [e.messages[-1]["content"] for e in loaded.examples] == ["hi", "bye", "yes"], source
    with pytest.raises(UserError, match="no split 'test'; it has train"):
        load(tmp_path / "saved", split="test")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"someone/nonexistent-data: cannot load this hub dataset \(split 'train'\)"):
        load("someone/nonexistent-data")


def test_unknown_choices_name_the_flag(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    with pytest.raises(UserError, match="--format yaml: unknown; choose auto or one of messages, sharegpt"):
        load(path, fmt="yaml")
    with pytest.raises(UserError, match="--on_bad_record ignore: choose error or skip"):
        load(path, on_bad_record="ignore")


HOSTILE = ["message_role_not_string.jsonl", "lone_surrogate.jsonl", "deeply_nested.jsonl", "integer_too_long.jsonl"]  # after a good messages record


@pytest.mark.parametrize("name", HOSTILE)
def test_with_skip_a_hostile_record_becomes_a_written_reject(tmp_path, name):
    good = '{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}\n'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good.encode() + (BAD / name).read_bytes())
    loaded = load(path, on_bad_record="skip")
    assert len(loaded.examples) == 1 and [r.source for r in loaded.rejects] == [f"{path}:2"]
    row = json.loads(loaded.rejects[0].to_json())  # what rejects.jsonl gets: valid JSON, UTF-8 encodable
    assert row["reason"] == BAD_CASES[name].split(": ", 1)[1] and row["reason"].encode("utf-8")


def test_size_limits_are_one_line(tmp_path, monkeypatch):
    """A .jsonl line or a CSV cell over MAX_RECORD_BYTES, a .json array over MAX_JSON_BYTES (limits
    lowered here: the real ones are 64 MiB and 512 MiB)."""
    from fasttune import data

    monkeypatch.setattr(data, "MAX_RECORD_BYTES", 1 << 20)
    monkeypatch.setattr(data, "MAX_JSON_BYTES", 2 << 20)
    good = {"prompt": "Q", "completion": "A"}
    huge = {"prompt": "Q", "completion": "x" * (3 << 20)}
    lines = tmp_path / "d.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in (good, huge, dict(good, prompt="Q2"))))
    loaded = load(lines, on_bad_record="skip")  # the line after the long one is read as usual
    assert [ex.source for ex in loaded.examples] == [f"{lines}:1", f"{lines}:3"]
    assert loaded.rejects[0].source == f"{lines}:2"
    assert loaded.rejects[0].reason.startswith("longer than 1 MiB, the most one record may be")
    table = tmp_path / "d.csv"
    table.write_text(f"prompt,completion\nQ,A\nQ2,{'x' * (3 << 20)}\n")  # one line: refused before it is held
    with pytest.raises(UserError, match=rf"^{table}:3: a line longer than 1 MiB, the most one CSV row may be"):
        load(table)
    cell = "\n".join(["x" * (1 << 19)] * 6)  # a quoted cell over many short lines: csv's own limit
    table.write_text(f'prompt,completion\nQ,A\nQ2,"{cell}"\n')
    with pytest.raises(UserError, match=rf"^{table}:3: cannot read this CSV row \(field larger than field limit "
                                        r".*\); a cell may be at most 1 MiB$"):
        load(table)
    array = tmp_path / "d.json"
    array.write_text(json.dumps([huge]))
    with pytest.raises(UserError, match=rf"^{array}: 3 MiB in one JSON array, which is read whole \(the limit is "
                                        r"2 MiB\); write it as .jsonl"):
        load(array)
