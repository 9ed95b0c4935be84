"""The memory planner: its counts match the model, its CPU prediction matches a measured run within
20 %, and --plan answers from a config alone (a Qwen2.5-7B config, no weights)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttune import model as model_lib  # first: imports unsloth
from bench.peak_memory import PeakMemory, file_mapped_bytes
from fasttune import plan
from fasttune.config import parse

ROOT = Path(__file__).resolve().parents[1]

def cfg_for(model, *flags):
    return parse(["--data", "d.jsonl", "--out", "o", "--model", str(model), *flags])


@pytest.mark.parametrize("model", ["tiny", "tiny-phi3.5"])  # Phi-3: LoRA on its fused projections
def test_shapes_count_what_the_model_and_peft_hold(model):
    cfg = cfg_for(model, "--lora_r", "16")
    s = plan.shapes(model, cfg.model.lora_target_modules)
    model, _ = model_lib.load_for_training(cfg.model, seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 16 * s.lora_per_rank == trainable
    hf = model.get_base_model()
    # 4-bit linears hold two weights per byte: count them back to weights
    stored = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for n, p in hf.named_parameters() if "lora_" not in n)
    assert s.linear + s.other == stored


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen3", "tiny-llama3.2", "tiny-phi3.5"])
def test_plan_answers_for_every_family(model):
    """--plan for each family the converter writes: the table, with LoRA on the family's own layer names."""
    cfg = cfg_for(model, "--plan")
    text = plan.describe(cfg.model, cfg.train, cfg.train.gpu_gb)
    assert "peak" in text


def test_a_model_without_a_readable_config_is_one_line(tmp_path):
    with pytest.raises(plan.UserError, match="cannot read its config.json"):
        plan.shapes(str(tmp_path / "no-such-model"), ["q_proj"])


def test_qwen2_5_7b_weights_match_its_published_sizes(qwen7b_config):
    s = plan.shapes(str(qwen7b_config), cfg_for(qwen7b_config).model.lora_target_modules)
    assert abs((s.linear + s.other) / 1e9 - 7.62) < 0.01  # Qwen2.5-7B: 7.61 B parameters (model card)
    p16 = plan.plan(cfg_for(qwen7b_config, "--no-4bit").model, cfg_for(qwen7b_config).train, "cuda", s)
    p4 = plan.plan(cfg_for(qwen7b_config).model, cfg_for(qwen7b_config).train, "cuda", s)
    assert abs(p16.weights / 1e9 - 15.23) < 0.05  # bf16 safetensors: 15.23 GB
    # nf4 linears + bf16 embeddings and head: what bitsandbytes' 4-bit checkpoints of it weigh (~5.5 GB)
    assert 5.0 < p4.weights / 1e9 < 5.8


def measured_peak(cfg, steps=2) -> int:
    """Load and train on CPU under bench/peak_memory.PeakMemory; bytes over what the process held before loading."""
    from datasets import Dataset
    from trl import SFTTrainer

    from fasttune.train import sft_config

    seq = cfg.model.max_seq_length
    rows = [{"input_ids": list(range(1000, 1000 + seq)), "labels": list(range(1000, 1000 + seq))}] * (
        cfg.train.batch_size * steps)
    # One thread and a 1 ms sampler: the shortest-lived block (a loss chunk of 2**24 logits) then takes
    # tens of milliseconds on any CPU, so the sampler sees it however many fast cores the machine has.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with PeakMemory(every_s=0.001) as memory:
            model, tokenizer = model_lib.load_for_training(cfg.model, seed=0)
            memory.mapped = file_mapped_bytes(model)  # weights read straight from the safetensors mmap
            model.config.use_cache = False
            args = sft_config(cfg, Path(cfg.train.out), has_eval=False)
            args.max_steps = steps
            SFTTrainer(model=model, processing_class=tokenizer, args=args,
                       train_dataset=Dataset.from_list(rows)).train()
        del model
    finally:
        torch.set_num_threads(threads)
    return memory.peak


@pytest.mark.parametrize("flags", [
    ("--batch_size", "2", "--max_seq_length", "512", "--lora_r", "16", "--lora_dropout", "0"),
    ("--no-4bit", "--batch_size", "2", "--max_seq_length", "512", "--lora_r", "64", "--gradient_checkpointing",
     "false", "--lora_dropout", "0.1"),  # the guide's dropout: its dropped copies are planned for
], ids=["4bit-b2-s512", "16bit-b2-s512-no-checkpointing-dropout"])
def test_cpu_prediction_is_within_20_percent_of_a_measured_run(tmp_path, flags):
    cfg = cfg_for("tiny", "--save_steps", "0", *flags)
    predicted = plan.plan(cfg.model, cfg.train, "cpu").total()
    # measured in a fresh process: in this one, whatever earlier tests loaded and cached (in any order)
    # would be missing from the measured run
    done = subprocess.run([sys.executable, "-m", "tests.test_plan", str(tmp_path), "--save_steps", "0", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = int(done.stdout.strip().splitlines()[-1])
    assert abs(predicted / measured - 1) < 0.20, (predicted / 2**20, measured / 2**20)


@pytest.mark.slow
def test_cpu_prediction_on_the_qwen2_5_0_5b_shape(tmp_path):
    from fasttune.tiny import QWEN2_5_0_5B_CONFIG, build_model, cache_dir

    path = build_model(cache_dir() / "qwen2.5-0.5b-shaped", QWEN2_5_0_5B_CONFIG)
    cfg = cfg_for(path, "--save_steps", "0", "--batch_size", "1", "--max_seq_length", "512", "--lora_r", "16")
    cfg.train.out = str(tmp_path)
    predicted = plan.plan(cfg.model, cfg.train, "cpu").total()
    measured = measured_peak(cfg)
    assert abs(predicted / measured - 1) < 0.20, (predicted / 2**20, measured / 2**20)


def test_plan_flag_answers_from_the_config_alone(qwen7b_config):
    """No weights, no --data, no --out: the table, the verdict and what to lower."""
    out = subprocess.run([sys.executable, "recipes/sft.py", "--model", str(qwen7b_config), "--no-4bit", "--plan",
                          "--gpu-gb", "16", "--batch_size", "2", "--max_seq_length", "2048"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for row in ("weights", "LoRA + optimizer", "activations: layer inputs", "logits (loss)", "peak", "16 GB GPU"):
        assert row in text, row
    fits = next(line for line in text.splitlines() if line.strip().startswith("fits"))
    assert fits.split()[-1] == "NO"  # 15.2 GB of bf16 weights alone
    four_bit = next(line for line in text.splitlines() if "--load_in_4bit true" in line)
    assert float(four_bit.split("needs ")[1].split()[0]) < 16
    assert "on this CPU" in text or torch.cuda.is_available()


def test_gpu_plan_never_exceeds_the_gpu_it_fits(qwen7b_config):
    """Unsloth sizes its loss chunks from the free memory: the peak stays under the card when it fits."""
    cfg = cfg_for(qwen7b_config, "--batch_size", "8", "--max_seq_length", "4096")
    p = plan.plan(cfg.model, cfg.train, "cuda")
    for gb in plan.GPU_SIZES_GB:
        if p.fits(gb * plan.GIB):
            assert p.total(gb * plan.GIB) <= gb * plan.GIB
    assert p.fits(24 * plan.GIB) and not p.fits(8 * plan.GIB)


def test_after_training_the_streamed_steps_stay_flat_and_the_plan_says_so(qwen7b_config):
    """A 7B's merge and export fit in 4 GB of RAM; the whole-model steps are counted as what they are."""
    cfg = cfg_for(qwen7b_config, "--lora_r", "16")
    big = dict(plan.after_training(plan.shapes(cfg.model.model, cfg.model.lora_target_modules), 16, "cpu"))
    small = dict(plan.after_training(plan.shapes("tiny", cfg.model.lora_target_modules), 16, "cpu"))
    on_gpu = dict(plan.after_training(plan.shapes(cfg.model.model, cfg.model.lora_target_modules), 16, "cuda"))
    assert big["merge (streamed)"] < 4 * plan.GIB and big["GGUF export (streamed)"] < 4 * plan.GIB
    assert big["merge (streamed)"] < 10 * small["merge (streamed)"]  # the model is ~2000 times larger
    assert big["evaluation, fidelity reference"] > 4 * 7.6e9  # 7.6 B parameters in float32
    assert on_gpu["evaluation, fidelity reference"] < 0.6 * big["evaluation, fidelity reference"]  # bf16
    out = subprocess.run([sys.executable, "recipes/sft.py", "--model", str(qwen7b_config), "--lora_r", "16", "--plan"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    merge_row = next(line for line in out.stdout.splitlines() if "merge (streamed)" in line)
    assert float(merge_row.split()[-1]) == pytest.approx(big["merge (streamed)"] / plan.GIB, abs=0.01)


if __name__ == "__main__":  # python -m tests.test_plan OUT_DIR FLAGS...: print the measured peak in bytes
    config = cfg_for("tiny", *sys.argv[2:])
    config.train.out = sys.argv[1]
    print(measured_peak(config))
