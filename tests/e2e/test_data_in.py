"""recipes/sft.py and --inspect as a user runs them: any format in, the mask shown, nothing lost."""

import json

from tests.conftest import run_script

GOOD = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
                  {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]},
    {"messages": [{"role": "user", "content": "Largest organ?"}, {"role": "assistant", "content": "The skin."}]},
    {"messages": [{"role": "user", "content": "Normal pH?"}, {"role": "assistant", "content": "7.35 to 7.45."}]},
]


def write_jsonl(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def test_inspect_shows_the_mask_and_trains_nothing(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", GOOD)
    out = tmp_path / "run"
    proc = run_script("recipes/sft.py", "--model", "tiny", "--data", data, "--out", out, "--inspect",
                      "--inspect_examples", "2")
    assert "train: 4 of 4 examples kept" in proc.stdout
    assert "mask page:" in proc.stdout
    page = (out / "inspect" / "mask.html").read_text()
    assert '<span class="t">Paris.&lt;|im_end|&gt;</span>' in page  # the answer and its stop token, trained
    assert '<span class="t">4.&lt;|im_end|&gt;</span>' in page  # every assistant turn of a multi-turn chat
    assert (out / "inspect" / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    stats = json.loads((out / "inspect" / "data_stats.json").read_text())
    assert stats["train"]["format"] == "messages" and stats["train"]["trained_tokens"] > 0
    assert not (out / "config.yaml").exists() and not (out / "adapter").exists()


def test_inspect_on_a_bad_file_exits_2(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", GOOD, ['{"messages": []}\n'])
    proc = run_script("recipes/sft.py", "--model", "tiny", "--data", data, "--out", tmp_path / "run", "--inspect",
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {data}:5: field 'messages': empty list")


def test_skip_trains_on_the_good_records_and_writes_the_rest(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", GOOD, ['{"messages": []}\n', "oops\n"])
    out = tmp_path / "run"
    run_script("recipes/sft.py", "--model", "tiny", "--data", data, "--out", out, "--on_bad_record", "skip",
               "--eval_fraction", "0.25", "--epochs", "1", "--lora_r", "8", "--quants", "none")
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejects] == [
        (f"{data}:5", "field 'messages': empty list"),
        (f"{data}:6", "invalid JSON: Expecting value (column 1)"),
    ]
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["train"]["kept"] == 3 and stats["eval"]["kept"] == 1  # 25 % held out, seeded
    assert stats["train"]["rejected_records"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / "gguf").exists()
