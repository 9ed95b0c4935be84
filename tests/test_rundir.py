"""The run directory knows its contents: run.json, the data as trained, and refusals that say what changed."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fasttune import UserError, base_model, rundir
from fasttune.data import Example


@pytest.fixture
def run(tmp_path, tiny_dir):
    """A run directory as the data stage leaves it, on a private copy of the tiny base model."""
    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n{"a": 2}\n')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train = [Example("train.jsonl:1", [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}], {})]
    held = [Example("train.jsonl:2", [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], {})]
    rundir.start(run_dir, [rundir.source("train", str(data), 2)], train, held, base_model.identity(str(base)), seed=3)
    return run_dir, data, base


def test_the_data_as_trained_is_read_back_from_the_run(run):
    run_dir, data, _ = run
    manifest = rundir.load(run_dir)
    assert manifest["seed"] == 3 and manifest["sources"][0]["records"] == 2
    assert manifest["sources"][0]["sha256"] == rundir.sha256(data)
    assert set(manifest["versions"]) >= {"fasttune", "unsloth", "transformers", "trl", "peft", "llama_cpp_python"}
    data.unlink()  # the source is not needed any more
    assert [ex.messages[1]["content"] for ex in rundir.examples(run_dir, "train")] == ["a1"]
    assert [ex.source for ex in rundir.examples(run_dir, "eval")] == ["train.jsonl:2"]


def test_an_edited_data_file_in_the_run_is_refused(run):
    run_dir, _, _ = run
    path = run_dir / "data" / "eval.jsonl"
    path.write_text(path.read_text().replace("a2", "a3"))
    with pytest.raises(UserError, match=r"data/eval.jsonl: changed since training \(sha256 .* then, .* now\)"):
        rundir.examples(run_dir, "eval")


def test_changed_sources_are_refused_naming_what_changed(run):
    run_dir, data, _ = run
    rundir.check_sources(run_dir, [rundir.source("train", str(data), 2)])  # unchanged: fine
    data.write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n')
    with pytest.raises(UserError, match=r"train.jsonl changed since the run started .*2 records then, 3 now"):
        rundir.check_sources(run_dir, [rundir.source("train", str(data), 3)])


def test_a_changed_base_model_is_refused(run):
    run_dir, _, base = run
    rundir.check_base(run_dir)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-5)))
    with pytest.raises(UserError, match=r"config.json changed since training"):
        rundir.check_base(run_dir)
    shutil.rmtree(base)
    with pytest.raises(UserError, match=r"not found"):
        rundir.check_base(run_dir)


def test_files_are_listed_by_kind_not_guessed_from_names(run):
    run_dir, _, _ = run
    gguf = run_dir / "gguf"
    gguf.mkdir()
    for name in ("run-q4_k_m.gguf", "run-bf16.gguf", "imatrix.gguf", "stray.gguf"):
        (gguf / name).write_bytes(b"GGUF")
    rundir.add_file(run_dir, gguf / "run-q4_k_m.gguf", "model", "q4_k_m")
    rundir.add_file(run_dir, gguf / "run-bf16.gguf", "model", "bf16")
    rundir.add_file(run_dir, gguf / "imatrix.gguf", "imatrix")
    rundir.add_file(run_dir, gguf / "run-bf16.gguf", "model", "bf16")  # listed again: once
    assert [(p.name, t) for p, t in rundir.models(run_dir)] == [("run-bf16.gguf", "bf16"), ("run-q4_k_m.gguf", "q4_k_m")]
    (gguf / "run-q4_k_m.gguf").unlink()  # a deleted file is not reported as there
    assert [p.name for p, _ in rundir.models(run_dir)] == ["run-bf16.gguf"]


def test_old_runs_and_other_folders_are_refused_with_how_to_rerun(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        rundir.load(tmp_path)
    (tmp_path / "config.yaml").write_text("model: tiny\n")
    with pytest.raises(UserError, match="made by an older fasttune.*--overwrite"):
        rundir.load(tmp_path)


def test_a_second_process_on_a_run_is_refused_naming_the_holder(tmp_path):
    rundir.lock(tmp_path)  # held by this process until it exits
    code = f"from fasttune import cli, rundir; cli.run(lambda: rundir.lock({str(tmp_path)!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"is in use by process {os.getpid()} (`" in done.stderr and "wait for it to finish" in done.stderr


def test_the_next_process_removes_what_a_killed_one_left(tmp_path):
    leftovers = [tmp_path / "gguf" / "candidates" / "run-q6_k.gguf", tmp_path / "gguf" / "run-bf16.gguf.partial",
                 tmp_path / "merged.tmp12ab" / "model.safetensors", tmp_path / ".run.json.123.partial"]
    kept = [tmp_path / "gguf" / "run-bf16.gguf", tmp_path / "merged" / "model.safetensors"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    done = subprocess.run([sys.executable, "-c", f"from fasttune import rundir; rundir.lock({str(tmp_path)!r})"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    assert not (tmp_path / "gguf" / "candidates").exists() and not (tmp_path / "merged.tmp12ab").exists()
    assert "removed 4 leftovers of an interrupted run" in done.stderr


def test_in_seeded_order_is_every_example_shuffled_by_the_run_s_seed(sorted_run):
    in_file = rundir.examples(sorted_run, "train")
    shuffled = rundir.in_seeded_order(sorted_run, "train")
    assert sorted(ex.source for ex in shuffled) == sorted(ex.source for ex in in_file)  # none lost or repeated
    assert [ex.source for ex in shuffled] == [ex.source for ex in rundir.in_seeded_order(sorted_run, "train")]
    first = [ex.messages[-1]["content"] for ex in shuffled[:64]]
    assert 16 <= first.count("bmi") <= 48  # the file's first 600 are all "dose"
