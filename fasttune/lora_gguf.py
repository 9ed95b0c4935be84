"""A PEFT LoRA adapter as a GGUF adapter that llama.cpp applies over the base model at load time."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import gguf
from safetensors import safe_open

from fasttune import UserError
from fasttune.convert import ARCHITECTURES, _permute_qk

logger = logging.getLogger(__name__)


def convert_lora(adapter_dir: str | Path, out_path: str | Path, base_dir: str | Path, name: str | None = None) -> Path:
    """Write a PEFT LoRA adapter as a GGUF adapter (F32) that llama.cpp applies over a GGUF of the base
    model at load time: `llama-cli -m base.gguf --lora this.gguf`, `Llama(..., lora_path=this)`.

    llama.cpp computes W + (alpha / r) * B @ A from `adapter.lora.alpha` and A's rank; tensors are
    named after the base weight plus `.lora_a` / `.lora_b` (the layout of llama.cpp's
    convert_lora_to_gguf.py). Llama's q/k permutation permutes B's rows, as it does W's.
    """
    from transformers import AutoConfig

    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(base_dir)
    arch = ARCHITECTURES.get((config.architectures or ["?"])[0])
    if arch is None:
        raise UserError(f"{base_dir}: architecture {config.architectures} is not supported; supported: "
                        f"{', '.join(ARCHITECTURES)}")
    pairs, scale = read_adapter(adapter_dir)
    alpha = scale * read_config(adapter_dir)["r"]  # llama.cpp scales by alpha / (A's rank)
    names = gguf_names(config)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}

    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or adapter_dir.name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for hf_name, ab in pairs.items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise UserError(f"{adapter_dir}: cannot place the LoRA pair for {hf_name} in a GGUF adapter")
            n_head = heads.get(hf_name.rsplit(".", 2)[-2]) if arch.permute_qk else None
            lora_b = _permute_qk(ab["b"], n_head) if n_head else ab["b"]
            writer.add_tensor(gguf_name + ".lora_a", ab["a"].numpy())
            writer.add_tensor(gguf_name + ".lora_b", lora_b.contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%.1f MB, %d LoRA pairs)", out_path, out_path.stat().st_size / 1e6, len(pairs))
    return out_path


def read_config(adapter_dir: Path) -> dict:
    """adapter_config.json, refused when no llama.cpp LoRA can hold it."""
    peft = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if peft.get("use_dora") or peft.get("rank_pattern") or peft.get("alpha_pattern") or peft.get("modules_to_save"):
        raise UserError(f"{adapter_dir}: DoRA, per-module ranks/alphas and modules_to_save have no GGUF adapter "
                        "form; export the merged model instead")
    return peft


def read_adapter(adapter_dir: str | Path) -> tuple[dict, float]:
    """({HF weight name: {"a": A (r, in), "b": B (out, r)}} in fp32, scale): the delta of each weight is
    scale * B @ A (scale: alpha / r, or alpha / sqrt(r) for rsLoRA)."""
    adapter_dir = Path(adapter_dir)
    peft = read_config(adapter_dir)
    scale = float(peft["lora_alpha"]) / (peft["r"] ** 0.5 if peft.get("use_rslora") else peft["r"])
    pairs: dict[str, dict] = {}
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            base_name = key.removeprefix("base_model.model.")
            for part in ("a", "b"):
                suffix = f".lora_{part.upper()}.weight"
                if base_name.endswith(suffix):
                    pairs.setdefault(base_name.removesuffix(suffix) + ".weight", {})[part] = f.get_tensor(key).float()
                    break
            else:
                raise UserError(f"{adapter_dir}: tensor {key} is not a LoRA A/B matrix; export the merged model instead")
    for hf_name, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            raise UserError(f"{adapter_dir}: {hf_name} has a LoRA {'A' if 'a' in ab else 'B'} matrix without its pair")
    return pairs, scale


def gguf_names(config):
    """gguf-py's HF -> GGUF tensor name table for a transformers config (get_name(hf, try_suffixes=(".weight",)))."""
    arch = ARCHITECTURES[(config.architectures or ["?"])[0]]
    return gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
