"""Supervised fine-tuning with TRL's SFTTrainer (patched by Unsloth), loss on assistant tokens only.

Wiring only: the chat template decides what is trained (see chat.py), TRL tokenizes and masks,
Unsloth supplies the kernels. Writes metrics.jsonl and loss.png into the run directory.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from fasttune import UserError, rundir
from fasttune.config import Config
from fasttune.dataset import TrainingData

logger = logging.getLogger(__name__)

CUDA_ONLY_OPTIMIZERS = ("paged_", "adamw_8bit", "adamw_bnb_8bit", "lion_8bit")


class MetricsLog(TrainerCallback):
    """Appends every trainer log (loss, lr, eval_loss) to metrics.jsonl as it happens, and stops the
    run at the first training or eval loss that is not a finite number: nothing is merged or exported
    from a diverged run."""

    def __init__(self, path: Path, learning_rate: float):
        self.path, self.learning_rate = path, learning_rate

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")
        for key in ("loss", "eval_loss"):  # not grad_norm: in fp16 an inf norm is a step the loss scaler skips
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise UserError(f"training diverged at step {state.global_step}: {key} is {value}. Nothing was "
                                f"exported. Usual causes: a learning rate too high (--learning_rate "
                                f"{self.learning_rate:g}: try a tenth), fp16 overflow on a GPU without bf16, or "
                                "a broken base model; start again with --overwrite")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # A checkpoint may fall between two logs: never write one from weights a diverged step left
        # non-finite (DefaultFlowCallback, which runs first, has just decided whether to save).
        if control.should_save and model is not None:
            self._check_finite(model, state.global_step, "no checkpoint was written from it")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:  # the adapter is saved next: not from weights that diverged after the last log
            self._check_finite(model, state.global_step, "the adapter was not saved")

    def _check_finite(self, model, step: int, consequence: str) -> None:
        bad = next((name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()),
                   None)
        if bad:
            raise UserError(f"training diverged by step {step}: {bad} is not finite; {consequence}. Usual causes: "
                            f"a learning rate too high (--learning_rate {self.learning_rate:g}: try a tenth), fp16 "
                            "overflow on a GPU without bf16; start again with --overwrite")


class KeepAdapterDtype(TrainerCallback):
    """After a resume, put the trainable (LoRA) weights and their optimizer state back in the dtype
    training used.

    TRL keeps QLoRA adapters in bf16 (the QLoRA paper's setting), but resuming loads them through
    PEFT's load_adapter, which upcasts to float32: the resumed run would train at another precision
    and end elsewhere than an uninterrupted one. Written by hand: no library option covers it.
    """

    def __init__(self, model):
        self.dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        for name, param in model.named_parameters():
            want = self.dtypes.get(name)
            if want is None or param.dtype == want:
                continue
            param.data = param.data.to(want)
            for key, value in (optimizer.state.get(param) or {}).items() if optimizer else ():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    optimizer.state[param][key] = value.to(want)


def sft_config(cfg: Config, output_dir: Path, has_eval: bool) -> SFTConfig:
    t = cfg.train
    optim = t.optim
    if not torch.cuda.is_available() and optim.startswith(CUDA_ONLY_OPTIMIZERS):
        logger.warning("optimizer %s needs CUDA; using adamw_torch on this CPU", optim)
        optim = "adamw_torch"
    if t.packing and not torch.cuda.is_available():
        logger.warning("--packing: Unsloth's CPU backend trains unpacked (it packs only with GPU attention kernels)")
    bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
    return SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of total steps
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        optim=optim,
        logging_steps=t.logging_steps,
        seed=t.seed,
        bf16=bf16,
        fp16=torch.cuda.is_available() and not bf16,
        max_length=cfg.model.max_seq_length,
        # TRL 1.15 turns checkpointing on by default; the model config decides (Unsloth set its variant).
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        packing=cfg.train.packing,  # best-fit packing, padding-free: per-example position ids
        eval_strategy="epoch" if has_eval else "no",
        # Checkpoints hold adapter, optimizer, scheduler, RNG and step (Trainer's own format); two are
        # kept because a kill during a save leaves the newest one incomplete.
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=False,
    )


def train(model, tokenizer, td: TrainingData, cfg: Config, run_dir: Path):
    """Train in place on the prepared rows ({"input_ids", "labels"} from chat.prepare); write loss.png.

    The rows carry our mask as labels, which TRL uses as they are. Returns the trainer (its
    state.log_history holds the losses).
    """
    eval_rows = td.eval.prepared.rows if td.eval else []
    # No KV cache while training: with one, transformers also skips the per-example attention mask
    # that packed (padding-free) batches need.
    model.config.use_cache = False
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        args=sft_config(cfg, run_dir / "checkpoints", has_eval=bool(eval_rows)),
        train_dataset=Dataset.from_list(td.train.prepared.rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        callbacks=[MetricsLog(run_dir / "metrics.jsonl", cfg.train.learning_rate)],
    )
    trainer.add_callback(KeepAdapterDtype(trainer.model))  # after TRL has set the adapter dtype
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if cfg.train.resume else None
    if cfg.train.resume:
        if checkpoint is None:
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} (the run stopped before "
                            f"its first save at step {cfg.train.save_steps}); start it again with --overwrite")
        step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
        logger.info("resuming from %s (step %d)", checkpoint, step)
        _forget_metrics_after(run_dir / "metrics.jsonl", step)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError:
        raise UserError(out_of_memory_advice(cfg)) from None
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return trainer


def save_adapter(model, tokenizer, path: Path) -> None:
    """The PEFT adapter and its tokenizer, written beside `path` and renamed into place whole: a kill
    leaves either the old adapter or the new one under `path`, never half of one."""
    import os
    import shutil

    tmp, old = path.with_name(f"{path.name}.tmp"), path.with_name(f"{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():  # a resumed run's earlier adapter: set aside until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def out_of_memory_advice(cfg: Config, gpu_bytes: int | None = None) -> str:
    """What to lower when the GPU runs out of memory, with this run's numbers and the planner's
    prediction for each change (fasttune.plan)."""
    from fasttune import plan

    m, t = cfg.model, cfg.train
    if gpu_bytes is None:
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    sizes = plan.shapes(m.model, m.lora_target_modules)
    needs = plan.plan(m, t, "cuda", sizes).needs()
    tips = [f"{flags} -> needs {need / plan.GIB:.1f} GB" for flags, need in plan.remedies(m, t, sizes)]
    return (f"the GPU ({gpu_bytes / plan.GIB:.1f} GB) ran out of memory training with batch {t.batch_size} x "
            f"{m.max_seq_length} tokens, LoRA r {m.lora_r}, {'4-bit' if m.load_in_4bit else '16-bit'} base (it needs "
            f"{needs / plan.GIB:.1f} GB by the planner; --plan shows the breakdown); lower one of: " + "; ".join(tips)
            + "; and run again with --overwrite (--resume needs the settings unchanged)")


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint-N in folder that was written to the end (trainer_state.json is saved last)."""
    done = [c for c in folder.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    for c in set(folder.glob("checkpoint-*")) - set(done):
        logger.warning("%s is incomplete (interrupted while saving); skipped", c)
    return max(done, key=lambda c: int(c.name.split("-")[1]), default=None)


def _forget_metrics_after(metrics_path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint: training repeats those steps."""
    if metrics_path.is_file():
        kept = [row for row in _rows(metrics_path) if row["step"] <= step]
        rundir.write_jsonl(metrics_path, kept)


def _rows(metrics_path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut short by a kill mid-write is left out."""
    rows = []
    for line in filter(str.strip, metrics_path.read_text().splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: left out a line cut short (the run was killed while writing it)", metrics_path)
    return rows


def read_metrics(metrics_path: Path) -> dict[str, list[float]]:
    """{'loss': [...], 'eval_loss': [...]} in logging order, from metrics.jsonl."""
    rows = _rows(metrics_path)
    return {key: [r[key] for r in rows if key in r] for key in ("loss", "eval_loss")}


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    """loss.png: training loss per step, eval loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with rundir.replacing(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
