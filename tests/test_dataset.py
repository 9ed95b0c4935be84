"""The data stage as a recipe runs it: streamed from the file, the same statistics whether it holds
every example (training) or only those --inspect shows."""

import json

from fasttune import chat, config, data, dataset


def records(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f"{2 * i}."} for i in range(n)]


def cfg_for(path, *flags):
    return config.parse(["--model", "tiny", "--data", str(path), "--out", str(path.parent / "run"), *flags])


def test_inspect_holds_what_it_shows_and_counts_everything(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(40)) + "not json\n")
    cfg = cfg_for(path, "--on_bad_record", "skip")
    held = dataset.build(cfg, tokenizer)
    shown = dataset.build(cfg, tokenizer, hold=3)
    assert len(held.train.prepared.rows) == 40 and len(shown.train.prepared.rows) == 3
    assert shown.train.prepared.kept == held.train.prepared.kept[:3]
    assert shown.stats() == held.stats() and shown.stats()["train"]["kept"] == 40
    assert [r.source for r in shown.rejects] == [f"{path}:41"]


def test_the_file_is_tokenized_a_chunk_at_a_time_while_it_is_read(tmp_path, tokenizer, monkeypatch):
    """Tokenizing starts before the file is read to its end, and never sees more than a chunk."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(50)))
    monkeypatch.setattr(dataset, "CHUNK_EXAMPLES", 8)
    read, seen = [0], []
    read_records, tokenize_all = data.read_records, chat.tokenize_all

    def counting(*args, **kwargs):
        for item in read_records(*args, **kwargs):
            read[0] += 1
            yield item

    def watching(tokenizer, conversations, *args):
        seen.append((read[0], len(conversations)))
        return tokenize_all(tokenizer, conversations, *args)

    monkeypatch.setattr(data, "read_records", counting)
    monkeypatch.setattr(chat, "tokenize_all", watching)
    dataset.build(cfg_for(path), tokenizer, hold=3)
    assert seen[0] == (8, 8) and max(n for _, n in seen) == 8 and sum(n for _, n in seen) == 50


def test_eval_fraction_streamed_holds_out_the_seeded_share(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(30)))
    td = dataset.build(cfg_for(path, "--eval_fraction", "0.2", "--seed", "7"), tokenizer)
    at = data.held_out(30, 0.2, 7)
    assert len(at) == 6 and [ex.source for ex in td.eval.prepared.kept] == [f"{path}:{i + 1}" for i in sorted(at)]
    assert [ex.source for ex in td.train.prepared.kept] == [f"{path}:{i + 1}" for i in range(30) if i not in at]
    assert td.sources[0]["records"] == 30
    shown = dataset.build(cfg_for(path, "--eval_fraction", "0.2", "--seed", "7"), tokenizer, hold=2)
    assert shown.stats() == td.stats()


def test_a_bad_record_stops_tokenizing_and_every_one_is_still_listed(tmp_path, tokenizer, monkeypatch):
    """on_bad_record=error: the run stops at the end anyway, so nothing after the first bad record is
    tokenized; the error still names each bad line of the file."""
    import pytest

    from fasttune import UserError

    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) + "\n" for r in records(60)]
    lines[5], lines[50] = "not json\n", '{"prompt": 3}\n'
    path.write_text("".join(lines))
    monkeypatch.setattr(dataset, "CHUNK_EXAMPLES", 8)
    tokenized, tokenize_all = [], chat.tokenize_all
    monkeypatch.setattr(chat, "tokenize_all", lambda tok, conversations, *a: tokenized.append(len(conversations))
                        or tokenize_all(tok, conversations, *a))
    with pytest.raises(UserError, match=f"(?s){path}:6: .*{path}:51: ") as e:
        dataset.build(cfg_for(path), tokenizer)
    assert "2 bad records" in str(e.value) or str(e.value).count(str(path)) >= 2
    assert sum(tokenized) <= 8  # at most the chunk the first bad record was found in
    tokenized.clear()
    assert dataset.build(cfg_for(path, "--on_bad_record", "skip"), tokenizer).stats()["train"]["kept"] == 58
    assert sum(tokenized) == 58


def test_a_missing_eval_file_is_reported_before_the_train_file_is_tokenized(tmp_path, tokenizer, monkeypatch):
    import pytest

    from fasttune import UserError

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records(20)))
    tokenized = []
    monkeypatch.setattr(chat, "tokenize_all", lambda *a: tokenized.append(a) or [])
    for eval_file, message in (("missing.jsonl", "missing.jsonl: no such file"),
                               (str(path.with_suffix(".txt")), "unknown file type")):
        if eval_file.endswith(".txt"):
            path.with_suffix(".txt").write_text("x")
        with pytest.raises(UserError, match=message):
            dataset.build(cfg_for(path, "--eval_data", eval_file), tokenizer)
    assert tokenized == []
