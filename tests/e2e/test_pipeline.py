"""End to end through the entry points a user runs: recipe -> export -> chat, and bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from fasttune import rundir
from tests.conftest import MEMORIZE, REPO, greedy_agrees, only_the_bf16_gguf, run_script


def test_recipe_leaves_a_complete_run_directory(trained_run):
    run_dir, proc = trained_run
    for path in ["run.json", "data/train.jsonl", "data/eval.jsonl", "config.yaml", "metrics.jsonl", "loss.png", "data_stats.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json", "merged/model.safetensors",
                 "merged/config.json", "merged/chat_template.jinja", "gguf/memorize-bf16.gguf",
                 "gguf/memorize-q4_k_m.gguf", "eval/report.json", "eval/report.md", "eval/scores.png"]:
        assert (run_dir / path).is_file(), path
    assert not list(run_dir.rglob("*.partial")) and not list(run_dir.glob("merged.tmp*"))
    # the recipe answered a held-out case with the exported file, and the model stopped by itself
    assert "answered by memorize-q4_k_m.gguf" in proc.stdout
    assert "[stopped]" in proc.stdout
    assert "python export/chat.py" in proc.stdout and "python export/serve.py" in proc.stdout
    # base vs fine-tuned vs each GGUF on the eval data, with the recipe's metric (ROUGE-L)
    assert "evaluation on 4 held-out examples" in proc.stdout
    scores = {r["variant"]: r for r in json.loads((run_dir / "eval" / "report.json").read_text())["variants"]}
    assert list(scores) == ["base", "merged", "memorize-bf16.gguf", "memorize-q4_k_m.gguf"]
    assert scores["merged"]["score"] > 0.9 and scores["memorize-bf16.gguf"]["score"] > 0.9  # memorised
    assert scores["base"]["score"] < 0.3 and scores["base"]["stopped"] < scores["merged"]["stopped"] == 1.0
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["train"]["kept"] == 4 and stats["train"]["answers_cut"] == 0 and stats["train"]["format"] == "fields"
    assert not (run_dir / "rejects.jsonl").exists()


def test_export_script_adds_a_quant(tmp_path, trained_run):
    run_dir = tmp_path / "memorize"  # a copy: other tests read the shared run's report
    shutil.copytree(trained_run[0], run_dir, ignore=only_the_bf16_gguf)
    shutil.copy(trained_run[0] / "gguf" / "report.json", run_dir / "gguf")  # its q4_k_m row goes: no such file
    proc = run_script("export/gguf.py", run_dir, "--quant", "q8_0")
    out = run_dir / "gguf" / "memorize-q8_0.gguf"
    assert str(out) in proc.stdout and out.is_file()
    assert "memorize-q8_0.gguf: " in proc.stdout and "chat stop" in proc.stdout
    rows = json.loads((run_dir / "gguf" / "report.json").read_text())["files"]
    assert [r["file"] for r in rows] == ["memorize-bf16.gguf", "memorize-q8_0.gguf"]
    assert greedy_agrees(rows[-1])


def test_chat_one_shot_answers_and_stops(trained_run, memorized_chats):
    run_dir, _ = trained_run
    chat = memorized_chats[2].messages
    proc = run_script("export/chat.py", run_dir / "gguf" / "memorize-bf16.gguf",
                      "--system", chat[0]["content"], "--prompt", chat[1]["content"])
    assert proc.stdout.strip() == chat[2]["content"]


def test_chat_interactive_streams_and_exits(trained_run, memorized_chats):
    run_dir, _ = trained_run
    chat = memorized_chats[3].messages
    question = chat[1]["content"].replace("\n", " ")  # one line of input
    proc = subprocess.run(
        [sys.executable, "export/chat.py", str(run_dir / "gguf" / "memorize-bf16.gguf"), "--system", chat[0]["content"]],
        cwd=REPO, input=question + "\n\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "you> " in proc.stdout and "model> " in proc.stdout
    assert "model> Summary:" in proc.stdout  # the learned answer format, streamed


HINT = " (fix it, or pass --on_bad_record skip to leave it out)"


@pytest.mark.parametrize("content, message", [
    ('{"context": "c", "clinical_scenario": "s", "questions": "q", "summary": "s"}\n',
     "bad.jsonl:1: field 'answers': missing" + HINT),
    ('{"context": "c", "clinical_scenario": "s", "questions": ["q"], "summary": "s", "answers": "a"}\n',
     "bad.jsonl:1: field 'questions': expected a string, got array" + HINT),
    (MEMORIZE.read_text() + '{"context": "c", "clinical_scenario": \n',
     "bad.jsonl:5: invalid JSON: Expecting value (column 39)" + HINT),
    ("", "bad.jsonl: no records (the file is empty)"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_dir(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "run"
    proc = run_script("recipes/clinical_qa.py", "--model", "tiny", "--data", bad, "--out", out, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad.parent}/{message}"
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_usage_errors_exit_2(tmp_path):
    proc = run_script("export/gguf.py", tmp_path, check=False)
    assert proc.returncode == 2 and "not a run directory (no run.json)" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "config.yaml").write_text("model: tiny\n")  # a run from before run.json
    for script in ("export/gguf.py", "export/eval.py"):
        proc = run_script(script, tmp_path, check=False)
        assert proc.returncode == 2 and "made by an older fasttune" in proc.stderr and "--overwrite" in proc.stderr
    proc = run_script("recipes/sft.py", "--data", MEMORIZE, "--out", tmp_path / "x", check=False)
    assert proc.returncode == 2 and "--model required" in proc.stderr and "--model tiny" in proc.stderr
    proc = run_script("export/chat.py", tmp_path / "missing.gguf", "--prompt", "hi", check=False)
    assert proc.returncode == 2 and "no such GGUF file" in proc.stderr


def test_a_run_exports_and_evaluates_the_same_from_anywhere_once_its_data_is_gone(tmp_path):
    """After training, the run directory is the only input: the source file deleted, the scripts run from
    another directory, the held-out split (--eval_fraction) and the answers are the recipe's."""
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    src.mkdir(), elsewhere.mkdir()
    shutil.copy(MEMORIZE, src / "data.jsonl")
    run_dir = tmp_path / "runs" / "moved"
    run_script("recipes/clinical_qa.py", "--model", "tiny", "--data", src / "data.jsonl", "--eval_fraction", "0.5",
               "--out", run_dir, "--epochs", "2", "--lora_r", "8", "--quants", "bf16", "--max_new_tokens", "16")
    first = json.loads((run_dir / "eval" / "report.json").read_text())
    shutil.rmtree(src)

    def from_elsewhere(*args):
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=elsewhere, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    from_elsewhere(REPO / "export" / "eval.py", run_dir, "--variants", "merged", "--out", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [a["source"] for a in again["answers"]] == [a["source"] for a in first["answers"]]  # the same 2 of 4
    assert [a["answers"]["merged"] for a in again["answers"]] == [a["answers"]["merged"] for a in first["answers"]]
    from_elsewhere(REPO / "export" / "gguf.py", run_dir, "--quant", "q4_k_m")  # calibrated on the run's data
    assert [t for _, t in rundir.models(run_dir)] == ["bf16", "q4_k_m"]
