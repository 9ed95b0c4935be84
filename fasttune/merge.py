"""Merge a LoRA adapter into the original 16-bit base weights, one tensor at a time.

Never into dequantized 4-bit weights: the base is read from its own checkpoint, each delta is added
in float32 (one rounding, at the end) and saved in the base's dtype. Unsloth's merge code notes that
merging onto dequantized 4-bit weights raised Qwen2.5 perplexity by about 20 %.

Streaming, written here because PEFT's merge_and_unload needs the whole model in memory (in float32:
about 30 GB for a 7B). Each base tensor is read from its safetensors file; where the adapter has a
LoRA pair for it, it becomes W + (B @ A) * scaling in float32 (PEFT's operations in PEFT's order:
the result is equal bit for bit); it goes to an output shard of at most SHARD_BYTES. Memory: one
output shard plus one tensor in float32, whatever the model's size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from fasttune import UserError
from fasttune.convert import safetensors_files

logger = logging.getLogger(__name__)

SHARD_BYTES = 512 << 20  # output shard size: what the merge holds besides one float32 tensor
ADAPTER_PREFIX = "base_model.model."  # PEFT's adapter keys: <prefix><module>.lora_A.weight


def base_model_of(adapter_dir: Path) -> str:
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"{adapter_dir}: no adapter_config.json; is this a LoRA adapter directory?")
    return json.loads(config.read_text())["base_model_name_or_path"]


def base_directory(base: str) -> Path:
    """A base model's folder: a local directory as is; a hub name from the Hugging Face cache, or
    downloaded (online): Unsloth may have trained on its 4-bit copy, another repository."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(base, allow_patterns=patterns, local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as e:  # noqa: BLE001  (no network, unknown name, not in the cache: the hub raises many types)
        raise UserError(f"{base}: the 16-bit base model is neither a directory nor in the Hugging Face cache "
                        f"({type(e).__name__}); download it with `hf download {base}`, or pass its folder") from None


def lora_pairs(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """({base weight name: (A, B)}, scaling) of a PEFT LoRA adapter as fasttune trains them: plain LoRA
    (no DoRA, no per-module rank or alpha), one scaling for all, alpha / r (alpha / sqrt(r): rsLoRA)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter_dir / 'adapter_config.json'}: a {config['peft_type']} adapter; fasttune merges "
                        "LoRA adapters (merge this one with PEFT's merge_and_unload)")
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out",
                               "lora_bias", "trainable_token_indices", "layer_replication") if config.get(k)]
    if unsupported:
        raise UserError(f"{adapter_dir / 'adapter_config.json'}: sets {', '.join(unsupported)}, which fasttune's "
                        "merge does not apply; merge it with PEFT's merge_and_unload")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    path = adapter_dir / "adapter_model.safetensors"
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:  # truncated or overwritten file
        raise UserError(f"{path} is damaged ({e}); restore it, or train again (RUN_DIR/checkpoints/checkpoint-*/ "
                        "holds the adapter of the last checkpoints)") from None
    pairs = {}
    for key in tensors:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):  # embeddings' LoRA, biases, full weights
            raise UserError(f"{path}: holds {key}, which is not a LoRA pair of a linear layer; fasttune's merge "
                            "would leave it out (merge this adapter with PEFT's merge_and_unload)")
        a_key = key.replace(".lora_B.", ".lora_A.")
        if a_key not in tensors or a_key.replace(".lora_A.", ".lora_B.") not in tensors:
            raise UserError(f"{path}: {key} has no {'lora_B' if a_key == key else 'lora_A'} beside it; restore the "
                            "adapter, or train again")
        module = a_key.removeprefix(ADAPTER_PREFIX).removesuffix(".lora_A.weight")
        pairs[f"{module}.weight"] = (tensors[a_key], tensors[a_key.replace(".lora_A.", ".lora_B.")])
    return pairs, scaling


def merged_tensor(weight: torch.Tensor, pair, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """W + (B @ A) * scaling in float32, rounded once to `dtype`: PEFT's LoRA merge, operation for operation."""
    if pair is None:
        return weight.to(dtype) if weight.is_floating_point() else weight
    a, b = pair
    delta = b.float() @ a.float()
    delta.mul_(scaling)  # in place: no third float32 matrix; the same bits as PEFT's out-of-place product
    merged = weight.float()
    merged += delta  # PEFT merges with an in-place += as well
    return merged.to(dtype)


def merge(adapter_dir: Path, out_dir: Path, base: str | None = None) -> Path:
    """Write base+adapter as safetensors (in the base's dtype) + config + tokenizer to out_dir, atomically."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    recorded = base_model_of(adapter_dir)
    base = base or recorded
    if base != recorded:
        logger.warning("%s was trained on %s; merging it onto %s", adapter_dir, recorded, base)
    base_dir = base_directory(base)
    config = AutoConfig.from_pretrained(base_dir)
    if getattr(config, "quantization_config", None):
        raise UserError(f"{base}: a quantized checkpoint; the merge needs the 16-bit base model it was made from")
    dtype = config.dtype or torch.bfloat16  # a torch.dtype in transformers 5
    pairs, scaling = lora_pairs(adapter_dir)
    # tied: the head is the embedding, which transformers' save_pretrained (and PEFT's merge) writes once
    skip = {"lm_head.weight"} if config.get_text_config().tie_word_embeddings else set()
    files = safetensors_files(base_dir, "the merge reads the 16-bit base tensor by tensor from safetensors (write a "
                                        "pytorch_model.bin checkpoint again with transformers' save_pretrained)")
    plan = _shards(files, dtype, skip)
    missing = sorted(set(pairs) - {name for shard in plan for name, _ in shard})
    if missing:
        raise UserError(f"{adapter_dir} does not fit {base} (it was trained on {recorded}): the base has no "
                        f"{missing[0]}")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=out_dir.name + ".tmp"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a run directory is not
        weight_map = {}
        with tqdm(total=sum(len(s) for s in plan), desc="merging the adapter", unit="tensor") as bar:
            for i, shard in enumerate(plan):
                name = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" if len(plan) > 1 else "model.safetensors"
                out = {}
                for key, file in shard:
                    with safe_open(file, framework="pt") as f:  # opened per tensor: no file stays mapped
                        weight = f.get_tensor(key)
                    delta_shape = (pairs[key][1].shape[0], pairs[key][0].shape[1]) if key in pairs else None
                    if delta_shape and delta_shape != tuple(weight.shape):
                        raise UserError(f"{adapter_dir} does not fit {base} (it was trained on {recorded}): size "
                                        f"mismatch for {key}: {tuple(weight.shape)} in the base, {delta_shape} in "
                                        "the adapter")
                    out[key] = merged_tensor(weight, pairs.get(key), scaling, dtype).contiguous()
                    weight_map[key] = name
                    bar.update()
                save_file(out, tmp / name, metadata={"format": "pt"})
                del out
        if len(plan) > 1:
            total = sum((tmp / n).stat().st_size for n in set(weight_map.values()))
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        config.save_pretrained(tmp)
        try:
            GenerationConfig.from_pretrained(base_dir).save_pretrained(tmp)
        except OSError:  # the base has no generation_config.json
            pass
        AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(tmp)  # with the run's chat template
        if (base_dir / "tokenizer.model").is_file():  # a SentencePiece model: its token scores go into the GGUF,
            shutil.copy(base_dir / "tokenizer.model", tmp / "tokenizer.model")  # and a fast tokenizer does not save it
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("merged %s onto %s -> %s (%s, %d LoRA pairs)", adapter_dir, base, out_dir, dtype, len(pairs))
    return out_dir


def _shards(files: list[Path], dtype: torch.dtype, skip: set[str]) -> list[list[tuple[str, Path]]]:
    """The base's tensors (name, file) but `skip`, in file order, cut into output shards of at most
    SHARD_BYTES (a larger tensor gets a shard of its own). Sizes come from the headers: nothing is loaded."""
    item = torch.empty((), dtype=dtype).element_size()
    shards, size = [[]], 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in (k for k in f.keys() if k not in skip):
                nbytes = math.prod(f.get_slice(key).get_shape()) * item
                if shards[-1] and size + nbytes > SHARD_BYTES:
                    shards.append([])
                    size = 0
                shards[-1].append((key, file))
                size += nbytes
    return shards
