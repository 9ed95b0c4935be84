"""Shared fixtures: the tiny model, its tokenizer, and one trained run the later stages reuse.

The trained run is the clinical QA recipe run as a user runs it (a subprocess), on four short
records it can memorise: then "the model stops where it should" and "greedy answers agree" are
checks with a known right answer, not hopes.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fasttune.model  # noqa: E402,F401  (unsloth before transformers/trl/peft, as in every entry point)

REPO = Path(__file__).resolve().parents[1]
MEMORIZE = REPO / "tests" / "data" / "memorize.jsonl"


def pytest_report_header(config):
    """What the numbers depend on, at the top of every run: CPU, its vector units, thread counts."""
    import platform

    import llama_cpp
    import torch

    from fasttune import cpu_threads

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info = llama_cpp.llama_print_system_info().decode()
    units = [f for f in ("AVX2", "AVX512", "AVX512_BF16", "AMX_INT8") if f"{f} = 1" in info]
    return [f"cpu: {model}; llama.cpp uses {', '.join(units) or 'no AVX2/AVX-512'}",
            f"threads: torch {torch.get_num_threads()}, llama.cpp {cpu_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"]


def model_folder(tmp_path, model_dir, weights: bool = True) -> Path:
    """tmp_path/model: model_dir's small files copied, its weights linked (not copied: 78 MB for the tiny one)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
        elif weights:
            (folder / f.name).symlink_to(f)
    return folder


def run_script(*args, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a repo script with this interpreter, from the repo root, capturing output."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


# Qwen/Qwen2.5-7B-Instruct's config.json, the fields that matter: the memory planner reads only the config.
QWEN2_5_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
              "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
              "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="session")
def qwen7b_config(tmp_path_factory) -> Path:
    """A directory holding only Qwen2.5-7B's config.json (no weights)."""
    import json

    folder = tmp_path_factory.mktemp("qwen2.5-7b-config")
    (folder / "config.json").write_text(json.dumps(QWEN2_5_7B))
    return folder


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from fasttune.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(run_dir, completed recipe process): tiny model, 4-bit QLoRA, taught four short answers."""
    run_dir = tmp_path_factory.mktemp("runs") / "memorize"
    proc = run_script(
        "recipes/clinical_qa.py", "--model", "tiny", "--data", MEMORIZE, "--eval-data", MEMORIZE,
        "--out", run_dir, "--epochs", "40", "--lora_r", "16", "--learning_rate", "3e-3",
        # dropout 0.1: the run the calibration and fidelity thresholds of its tests were measured on
        "--lora_dropout", "0.1", "--quants", "bf16", "q4_k_m", "--max_new_tokens", "64",
    )
    return run_dir, proc


def only_the_bf16_gguf(folder, names):
    """shutil.copytree ignore=: a run without checkpoints, and of its GGUF files only the bf16 one (other
    tests add files to the shared trained run)."""
    if Path(folder).name == "gguf":
        return [n for n in names if n != "memorize-bf16.gguf"]
    return ["checkpoints"] if "checkpoints" in names else []


# A greedy divergence from the merged model is allowed only where the merged model's own gap between
# the two tokens is below this (logits). On the memorising run the answers' steps have a median gap of
# about 11 with a few near-ties (one measured at 0.04), and the largest logit error of its bf16 and q8_0
# files is about 0.1 and 0.5: those files can flip a gap up to about 1, another model parts at ~11.
NEAR_TIE = 2.0


def greedy_agrees(row: dict) -> bool:
    """A fidelity-report row whose greedy continuations equal the merged model's but at near-ties."""
    return all(gap < NEAR_TIE for gap in row["greedy_divergence_gaps"])


@pytest.fixture(scope="session")
def memorized_chats():
    """The four training conversations as the recipe builds them (system, user, assistant)."""
    from fasttune import data
    from fasttune.config import read_task

    task = read_task(REPO / "recipes" / "clinical_qa.yaml")
    templates = data.Templates(task["user_template"], task["assistant_template"], task["system_prompt"])
    return data.load(MEMORIZE, templates, fmt="fields").examples


@pytest.fixture
def sorted_run(tmp_path, tiny_dir) -> Path:
    """A run directory (seed 3) whose training file is sorted by topic: 600 'dose' conversations, then
    600 'bmi' ones; merged/ is the tiny model. What the stages after training read a bounded part of
    must not be the first topic alone."""

    from fasttune import base_model, rundir
    from fasttune.data import Example

    train = [Example(f"train.jsonl:{i + 1}", [{"role": "user", "content": f"{topic} {i}"},
                                              {"role": "assistant", "content": topic}], {})
             for i, topic in enumerate(["dose"] * 600 + ["bmi"] * 600)]
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n" * len(train))
    run_dir = tmp_path / "run"
    rundir.start(run_dir, [rundir.source("train", str(data), len(train))], train, [],
                 base_model.identity(str(tiny_dir)), seed=3)
    shutil.copytree(tiny_dir, run_dir / "merged")
    return run_dir
