"""Load the base model through Unsloth's FastLanguageModel and attach LoRA adapters.

On a GPU this gives Unsloth's Triton kernels; on a CPU, unsloth 2026.10's CPU backend (stock
transformers + PEFT, bitsandbytes 4-bit on CPU). One code path for both.
Import this module (which imports unsloth) before trl/transformers/peft: Unsloth patches them.
"""

from __future__ import annotations

import logging

import unsloth  # noqa: F401  (must come first: it patches transformers, peft and trl)
import torch
from unsloth import FastLanguageModel

from fasttune import UserError
from fasttune.base_model import resolve
from fasttune.chat_formats import ensure_chat_template
from fasttune.config import ModelConfig, lora_targets

logger = logging.getLogger(__name__)


def load_tokenizer(name: str):
    """The model's tokenizer alone (fast): for --inspect and data preparation."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # a broken tokenizer file
        raise UserError(f"--model {name}: cannot read its tokenizer ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); copy its tokenizer files again") from None
    ensure_chat_template(tokenizer)
    return tokenizer


def load_for_training(cfg: ModelConfig, seed: int):
    """(peft model, tokenizer): the base in 4-bit (QLoRA) or 16-bit, LoRA on cfg.lora_target_modules (a fused
    layer for its parts: config.lora_targets)."""
    path = resolve(cfg.model)
    logger.info("loading %s (%s)", path, "4-bit nf4" if cfg.load_in_4bit else "16-bit")
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=path,
        max_seq_length=cfg.max_seq_length,
        # GPU: Unsloth picks bf16 where the card has it, else fp16. CPU: always bf16, the dtype the memory
        # planner and the tests assume; Unsloth alone would load fp32 on a CPU without AVX512-BF16/AMX.
        dtype=None if torch.cuda.is_available() else torch.bfloat16,
        load_in_4bit=cfg.load_in_4bit,
        load_in_16bit=not cfg.load_in_4bit,
    )
    ensure_chat_template(tokenizer)
    head = model.get_output_embeddings()
    linears = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(cfg.lora_target_modules, linears),
        bias="none",
        use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False,
        random_state=seed,
    )
    if not torch.cuda.is_available():
        # On a GPU Unsloth logs its own line: "Unsloth <version> patched N layers with N QKV layers, ...".
        logger.info("training path: Unsloth's CPU backend (transformers + PEFT forward; Unsloth's fused LoRA "
                    "kernels run on a GPU)")
    return model, tokenizer
