#!/usr/bin/env python
"""Training speed and memory: fasttune's recipe path vs the raw Unsloth API vs plain TRL + PEFT +
bitsandbytes, side by side in one run, on the same tokenized data.

    python bench/train.py [--model qwen2.5-0.5b-shaped|tiny] [--steps 4] [--batch 4] [--seq 512] [--packing]

Each path runs in its own process (Unsloth patches transformers/TRL/PEFT at import, so the plain
path must never import it; a fresh process also makes its peak memory its own):
  recipe   fasttune.model.load_for_training + fasttune.train.train (what recipes run)
  unsloth  FastLanguageModel.from_pretrained + get_peft_model + TRL SFTTrainer, the same settings
  trl      AutoModelForCausalLM (bitsandbytes nf4) + peft.get_peft_model + TRL SFTTrainer
On CPU the plain TRL path cannot run TRL 1.15's fused LM-head loss (a Triton kernel; Triton has no
CPU driver), so there it uses transformers' own loss on full logits, which is what plain TRL
computed before the fused head; on a GPU it runs TRL unchanged.
All: 4-bit nf4 base, LoRA r=16 alpha 16 dropout 0 on the seven projections, gradient
checkpointing, AdamW, lr 2e-4, the same variable-length rows (64 to --seq tokens, loss on the
second half), padded per batch (--packing: packed without padding, TRL's best-fit packing), bf16
compute. Unsloth's CPU backend trains unpacked whatever --packing says (it packs with GPU attention
kernels only), so on CPU --packing changes the plain TRL row alone. The first optimizer step is
warm-up and not timed; tokens are the trainer's own count of non-padding tokens seen.
Reported: trained-row tokens/s, seconds per step, peak memory (ru_maxrss of the process on CPU;
torch.cuda.max_memory_allocated on a GPU), and ratios to the plain TRL path; then the memory
planner's prediction for the recipe path against its own measurement (live heap + mapped weights on
CPU, CUDA allocations on a GPU; the planner assumes every row is --seq long, these rows are not, so
it should read high). Appends to bench/RESULTS.md.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results  # bench/results.py: this script's folder is on sys.path
from peak_memory import PeakMemory, file_mapped_bytes  # bench/peak_memory.py

MODES = ("recipe", "unsloth", "trl")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rows(n: int, max_len: int, seed: int = 0) -> list[dict]:
    """n rows of 64..max_len token ids; the second half of each is the trained answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(64, max_len)
        ids = [rng.randint(1000, 150000) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


class StepTimer:
    """TrainerCallback (built lazily: transformers must be imported after unsloth in its mode)."""

    @staticmethod
    def make():
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.stamps, self.tokens = [], []

            def on_step_end(self, args, state, control, **kwargs):
                self.stamps.append(time.perf_counter())
                self.tokens.append(state.num_input_tokens_seen)

        return _Timer()


def sft_args(out_dir: str, a) -> "object":
    import torch
    from trl import SFTConfig

    return SFTConfig(output_dir=out_dir, max_steps=a.steps + 1, per_device_train_batch_size=a.batch,
                     learning_rate=2e-4, lr_scheduler_type="constant", optim="adamw_torch", logging_steps=1,
                     save_strategy="no", report_to="none", max_length=a.seq, bf16=True,
                     gradient_checkpointing=True, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                     dataloader_drop_last=True, seed=0, packing=a.packing,
                     include_num_input_tokens_seen="non_padding")


def worker(mode: str, a) -> dict:
    model_path = a.model_path
    data = rows(a.batch * (a.steps + 1) * 3, a.seq)  # enough for steps+1 batches, packed or not
    timer = StepTimer.make() if mode == "trl" else None
    if mode in ("recipe", "plan", "unsloth"):
        import fasttune.model  # noqa: F401  (imports unsloth first, in both Unsloth modes)
    if mode in ("recipe", "plan"):
        from fasttune import config, plan, train
        from fasttune.chat import Prepared
        from fasttune.dataset import Split, TrainingData

        cfg = config.parse(["--data", "unused", "--out", a.out, "--model", model_path, "--lora_r", "16",
                            "--lora_alpha", "16", "--lora_dropout", "0", "--batch_size", str(a.batch),
                            "--learning_rate", "2e-4", "--max_seq_length", str(a.seq), "--epochs", "1",
                            "--save_steps", "0", "--optim", "adamw_torch", "--warmup_ratio", "0", "--seed", "0"]
                           + (["--packing"] if a.packing else []))
        # "plan": the recipe path again, to check the planner against it (live heap bytes on CPU, CUDA
        # allocations on GPU), in its own process: the heap sampler takes allocator locks and would slow
        # the timed run.
        memory = PeakMemory().__enter__() if mode == "plan" else None
        model, tokenizer = fasttune.model.load_for_training(cfg.model, seed=0)
        if memory:
            memory.mapped = file_mapped_bytes(model)
        td = TrainingData(Split(None, Prepared(data, [], [], {})), None)
        timer = StepTimer.make()
        original = train.SFTTrainer

        # train.train has no hook for a timer or a step limit, and the recipe path is what is measured:
        # wrap the trainer class it builds (bench only).
        def with_timer(*args, callbacks=(), **kwargs):
            kwargs["args"].max_steps = a.steps + 1
            kwargs["args"].include_num_input_tokens_seen = "non_padding"
            return original(*args, callbacks=[*callbacks, timer], **kwargs)

        train.SFTTrainer = with_timer
        train.train(model, tokenizer, td, cfg, Path(a.out))
        if memory:
            memory.__exit__(None, None, None)
            import torch

            predicted = plan.plan(cfg.model, cfg.train)
            if torch.cuda.is_available():  # max_memory_allocated leaves out the CUDA context
                planned = predicted.total(torch.cuda.get_device_properties(0).total_memory) - predicted.overhead
                measured = torch.cuda.max_memory_allocated()
            else:
                planned, measured = predicted.total(), memory.peak
    else:
        import torch
        from datasets import Dataset
        from trl import SFTTrainer

        if mode == "unsloth":
            from unsloth import FastLanguageModel

            model, tokenizer = FastLanguageModel.from_pretrained(model_name=model_path, max_seq_length=a.seq,
                                                                 load_in_4bit=True)
            model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0,
                                                     target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                                     random_state=0)
            timer = StepTimer.make()
        else:
            from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
            from transformers import (
                AutoModelForCausalLM,
                AutoTokenizer,
                BitsAndBytesConfig,
            )

            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=torch.bfloat16)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                     task_type="CAUSAL_LM"))
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        model.config.use_cache = False
        if mode == "trl" and not torch.cuda.is_available():
            # TRL 1.15 computes the loss with a fused LM head whose kernel is Triton-only (no CPU driver):
            # on CPU the plain path takes transformers' own loss (full logits, the model's cross-entropy).
            from transformers import Trainer

            SFTTrainer = type("SFTTrainerCPU", (SFTTrainer,), {"compute_loss": Trainer.compute_loss})
        trainer = SFTTrainer(model=model, processing_class=tokenizer, args=sft_args(a.out, a),
                             train_dataset=Dataset.from_list(data), callbacks=[timer])
        trainer.train()
    # steps 2..N+1: the first step is warm-up
    timed_tokens = timer.tokens[-1] - timer.tokens[0]
    seconds = timer.stamps[-1] - timer.stamps[0]
    import torch

    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    out = {"mode": mode, "tokens_per_s": timed_tokens / seconds, "step_s": seconds / a.steps, "peak_gpu_mb": peak_gpu}
    if mode == "plan":
        out.update(planned_mb=planned / 2**20, measured_mb=measured / 2**20)
    return out


def run_mode(mode: str, a) -> dict:
    """One mode in its own process: its result, plus the process's own peak RSS (os.wait4)."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as log:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", mode, "--model-path", a.model_path, "--steps", str(a.steps),
               "--batch", str(a.batch), "--seq", str(a.seq), "--out", tmp, "--result", str(result)]
        cmd += ["--packing"] if a.packing else []
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise RuntimeError(f"{mode} failed:\n{log.read().decode(errors='replace')[-3000:]}")
        out = json.loads(result.read_text())
    out["peak_rss_mb"] = usage.ru_maxrss / 1024
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b-shaped", choices=["qwen2.5-0.5b-shaped", "tiny"])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--packing", action="store_true", help="pack rows without padding (all three paths)")
    parser.add_argument("--worker", choices=(*MODES, "plan"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a.worker, a)))
        return

    from fasttune.tiny import (
        QWEN2_5_0_5B_CONFIG,
        build_model,
        cache_dir,
        tiny_model_dir,
    )

    a.model_path = str(tiny_model_dir() if a.model == "tiny" else
                       build_model(cache_dir() / "qwen2.5-0.5b-shaped", QWEN2_5_0_5B_CONFIG))
    by_mode = {mode: run_mode(mode, a) for mode in MODES}
    base = by_mode["trl"]
    memory = "peak_gpu_mb" if base["peak_gpu_mb"] is not None else "peak_rss_mb"
    lines = [f"| {a.model}, 4-bit LoRA r=16, batch {a.batch}, rows 64-{a.seq} tokens, "
             f"{'packed' if a.packing else 'padded'}, {a.steps} timed steps | "
             f"tokens/s | s/step | {'peak CUDA allocated' if memory == 'peak_gpu_mb' else 'peak RSS'} | "
             "speed vs plain TRL | memory vs plain TRL |", "|---|---|---|---|---|---|"]
    names = {"recipe": "fasttune recipe path", "unsloth": "raw Unsloth API", "trl": "plain TRL + PEFT + bitsandbytes"}
    for mode, r in by_mode.items():
        lines.append(f"| {names[mode]} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r[memory]:.0f} MB | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r[memory] / base[memory]:.2f}x |")
    r = run_mode("plan", a)
    lines.append(f"\nmemory planner (fasttune.plan) on the recipe path: predicted {r['planned_mb']:.0f} MB, measured "
                 f"{r['measured_mb']:.0f} MB ({'CUDA allocated' if memory == 'peak_gpu_mb' else 'live heap + mapped weights'}"
                 f"), ratio {r['planned_mb'] / r['measured_mb']:.2f}")
    table = "\n".join(lines)
    print(table)
    cmd = (f"python bench/train.py --model {a.model} --steps {a.steps} --batch {a.batch} --seq {a.seq}"
           + (" --packing" if a.packing else ""))
    results.append("bench/train.py", cmd, table)


if __name__ == "__main__":
    main()
