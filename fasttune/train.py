"""Supervised fine-tuning with TRL's SFTTrainer (patched by Unsloth), loss on assistant tokens only.

Wiring only: the chat template decides what is trained (see chat.py), TRL tokenizes and masks,
Unsloth supplies the kernels. Writes metrics.jsonl and loss.png into the run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from fasttune.config import Config
from fasttune.dataset import TrainingData

logger = logging.getLogger(__name__)

CUDA_ONLY_OPTIMIZERS = ("paged_", "adamw_8bit", "adamw_bnb_8bit", "lion_8bit")


class MetricsLog(TrainerCallback):
    """Appends every trainer log (loss, lr, eval_loss) to metrics.jsonl as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


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
        packing=cfg.train.packing,  # best-fit packing, padding-free: per-example position ids
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="no",
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
        callbacks=[MetricsLog(run_dir / "metrics.jsonl")],
    )
    trainer.train()
    plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return trainer


def _rows(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


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
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
