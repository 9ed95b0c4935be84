"""What happens on a home machine: the disk fills, a file is truncated or damaged. Each ends in a
one-line error (exit 2, no traceback), no broken file under a final name, and a way to carry on."""

import json
import shutil
import subprocess
import sys

import pytest

from fasttune import UserError, calibrate, merge
from tests.conftest import REPO, greedy_agrees, run_script


@pytest.fixture
def run_copy(tmp_path, trained_run):
    """The trained run's config, manifest, data, adapter and merged model, without its GGUF files."""
    src, _ = trained_run
    dst = tmp_path / "run"
    dst.mkdir()
    for part in ("config.yaml", "run.json"):
        shutil.copy(src / part, dst)
    for part in ("data", "adapter", "merged"):
        shutil.copytree(src / part, dst / part)
    return dst


# Run a script with files limited to MB megabytes, and that an error, not a kill: set in the child
# itself (a preexec_fn in this multithreaded pytest process could deadlock).
WITH_FILE_SIZE_LIMIT = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_disk_full_during_export_leaves_no_broken_file_and_a_rerun_finishes(run_copy):
    cmd = [sys.executable, "-c", WITH_FILE_SIZE_LIMIT, "30",  # the bf16 file is 86 MB
           "export/gguf.py", str(run_copy), "--quant", "bf16", "q4_k_m"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the disk is full")
    assert "Traceback" not in proc.stderr
    assert not list((run_copy / "gguf").glob("run-*.gguf")) and not list(run_copy.rglob("*.partial"))
    # the importance matrix (a few MB, written before the disk filled) is whole, and the rerun reuses it
    assert calibrate.ImportanceMatrix.load(run_copy / "gguf" / "imatrix.gguf").tokens > 0
    done = run_script("export/gguf.py", run_copy, "--quant", "bf16", "q4_k_m")  # space again
    assert (run_copy / "gguf" / "run-q4_k_m.gguf").is_file() and "chat stop" in done.stdout


def test_truncated_gguf_is_a_clear_error(tmp_path, trained_run):
    good = trained_run[0] / "gguf" / "memorize-q4_k_m.gguf"
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    proc = run_script("export/chat.py", bad, "--prompt", "hi", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() .endswith("re-export it") and "llama.cpp cannot load this file" in proc.stderr


def test_damaged_adapter_is_a_clear_error(tmp_path, run_copy, tiny_dir):
    weights = run_copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="adapter_model.safetensors is damaged .*checkpoint"):
        merge.merge(run_copy / "adapter", tmp_path / "merged", base=str(tiny_dir))
    assert not (tmp_path / "merged").exists()


def test_damaged_merge_is_reported_and_a_deleted_one_is_made_again(run_copy):
    weights = run_copy / "merged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    proc = run_script("export/gguf.py", run_copy, "--quant", "q8_0", check=False)
    assert proc.returncode == 2 and "model.safetensors is damaged" in proc.stderr and "Traceback" not in proc.stderr
    shutil.rmtree(run_copy / "merged")
    proc = run_script("export/gguf.py", run_copy, "--quant", "q8_0")
    assert (run_copy / "merged" / "model.safetensors").is_file() and "run-q8_0.gguf: " in proc.stdout
    rows = {r["file"]: r for r in json.loads((run_copy / "gguf" / "report.json").read_text())["files"]}
    assert greedy_agrees(rows["run-q8_0.gguf"])
