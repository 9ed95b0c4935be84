"""Merge a LoRA adapter into the original 16-bit base weights.

Never into dequantized 4-bit weights: the base is reloaded from its own checkpoint, the merge is
done in float32 (one rounding, at the end) and saved in the base's dtype. Unsloth's merge code
notes that merging onto dequantized 4-bit weights raised Qwen2.5 perplexity by about 20 %.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from fasttune import UserError

logger = logging.getLogger(__name__)


def base_model_of(adapter_dir: Path) -> str:
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; is this a LoRA adapter directory?")
    return json.loads(config.read_text())["base_model_name_or_path"]


def load_merged(adapter_dir: Path, base: str | None = None, dtype=torch.float32):
    """The base in float32 with the adapter merged in (and the tokenizer saved with the adapter)."""
    recorded = base_model_of(adapter_dir)
    base = base or recorded
    if base != recorded:
        logger.warning("%s was trained on %s; merging it onto %s", adapter_dir, recorded, base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except SafetensorError as e:  # truncated or overwritten file
        raise UserError(f"{adapter_dir / 'adapter_model.safetensors'} is damaged ({e}); restore it, or train again "
                        "(RUN_DIR/checkpoints/checkpoint-*/ holds the adapter of the last checkpoints)") from None
    except RuntimeError as e:  # PEFT: "Error(s) in loading state_dict ... size mismatch for ..."
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise UserError(f"{adapter_dir} does not fit {base} (it was trained on {recorded}): {first}") from None
    return model, AutoTokenizer.from_pretrained(str(adapter_dir))


def merge(adapter_dir: Path, out_dir: Path, base: str | None = None) -> Path:
    """Write base+adapter as safetensors (in the base's dtype) + tokenizer to out_dir, atomically."""
    base = base or base_model_of(adapter_dir)
    saved_dtype = AutoConfig.from_pretrained(base).dtype or torch.bfloat16  # a torch.dtype in transformers 5
    model, tokenizer = load_merged(adapter_dir, base)
    model.to(saved_dtype)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a run directory is not
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("merged %s onto %s -> %s (%s)", adapter_dir, base, out_dir, saved_dtype)
    return out_dir
