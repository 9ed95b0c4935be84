"""A run killed mid-way (SIGKILL) and resumed with --resume ends where an uninterrupted run ends."""

import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import MEMORIZE, REPO, run_script

# 4 examples, batch 1, 3 epochs: 12 optimizer steps, a checkpoint every 3; dropout on (RNG matters)
ARGS = ["--model", "tiny", "--data", MEMORIZE, "--batch_size", "1", "--epochs", "3", "--lora_r", "8",
        "--lora_dropout", "0.1", "--learning_rate", "1e-3", "--save_steps", "3", "--quants", "none",
        "--evaluate", "false"]


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# The recipe, killed with SIGKILL the moment its first checkpoint is complete: a power cut at a known
# step, whatever the machine's speed (a watcher polling for the checkpoint could lose the race).
KILLED_AFTER_FIRST_CHECKPOINT = """
import os, runpy, signal, sys
import fasttune.model  # unsloth before transformers, as in every entry point
from transformers import Trainer
save = Trainer._save_checkpoint
def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
Trainer._save_checkpoint = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_killed_run_resumes_to_the_same_adapter(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_script("recipes/clinical_qa.py", *ARGS, "--out", whole)

    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_FIRST_CHECKPOINT, "recipes/clinical_qa.py",
                           *map(str, ARGS), "--out", str(killed)], cwd=REPO, capture_output=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (killed / "checkpoints" / "checkpoint-6").exists() and not (killed / "adapter").exists()

    done = run_script("recipes/clinical_qa.py", *ARGS, "--out", killed, "--resume")
    assert "resuming from" in done.stdout + done.stderr
    a, b = adapter(whole), adapter(killed)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-6, worst
    steps = [line for line in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 12  # the log repeats no step and misses none


def test_resume_refuses_changed_settings_and_a_missing_run(tmp_path):
    proc = run_script("recipes/clinical_qa.py", *ARGS, "--out", tmp_path / "none", "--resume", check=False)
    assert proc.returncode == 2 and "holds no run" in proc.stderr
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("")
    from fasttune.config import create_run_dir, parse

    create_run_dir(parse(["--model", "tiny", "--data", str(MEMORIZE), "--out", str(tmp_path / "r2")]))
    with pytest.raises(Exception, match="differ from the run's config.yaml: lora_r"):
        create_run_dir(parse(["--model", "tiny", "--data", str(MEMORIZE), "--out", str(tmp_path / "r2"), "--lora_r",
                              "4", "--resume"]))


def test_resume_refuses_changed_data_before_writing_anything(tmp_path):
    data, run_dir = tmp_path / "data.jsonl", tmp_path / "run"
    data.write_text(MEMORIZE.read_text())
    args = [a if a != MEMORIZE else data for a in ARGS] + ["--epochs", "1", "--out", run_dir]
    run_script("recipes/clinical_qa.py", *args)
    files = lambda: {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    data.write_text(MEMORIZE.read_text() + MEMORIZE.read_text().splitlines()[0] + "\n")  # one record more
    proc = run_script("recipes/clinical_qa.py", *args, "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert f"{data} changed since the run started" in message and "4 records then, 5 now" in message, message
    assert files() == before  # nothing written (the lock file names the process that holds the run)
