"""Merging: the streamed merge equals PEFT's merge_and_unload bit for bit, and gives the same logits
as base + adapter unmerged."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from fasttune import UserError
from fasttune import merge as merge_lib
from fasttune import model as model_lib
from fasttune.merge import base_model_of, merge


def prompt_ids(tokenizer, chat):
    out = tokenizer.apply_chat_template(chat.messages[:-1], add_generation_prompt=True, return_dict=True)
    return torch.tensor([list(out["input_ids"])])


def peft_merged(adapter_dir, base_path):
    """The reference: PEFT's merge in float32 over the whole model, rounded to bf16 at the end."""
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().to(torch.bfloat16).state_dict()


def saved_tensors(model_dir):
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def test_streamed_merge_equals_peft_bit_for_bit(trained_run, tmp_path, monkeypatch):
    run_dir, _ = trained_run
    base_path = model_lib.resolve("tiny")
    reference = peft_merged(run_dir / "adapter", base_path)
    one = saved_tensors(run_dir / "merged")  # the recipe's merge
    monkeypatch.setattr(merge_lib, "SHARD_BYTES", 1 << 20)  # the tiny model's 7.6 MB in several shards
    sharded = merge(run_dir / "adapter", tmp_path / "sharded", base=base_path)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    many = saved_tensors(sharded)
    assert set(index["weight_map"]) == set(many)
    base = saved_tensors(Path(base_path))
    changed = 0
    for name, tensor in reference.items():
        if name not in one:  # a tied lm_head: saved once, as the embedding
            assert torch.equal(tensor, reference["model.embed_tokens.weight"])
            continue
        assert one[name].dtype == torch.bfloat16 and torch.equal(one[name], tensor), name
        assert torch.equal(many[name], tensor), name
        changed += not torch.equal(base[name], tensor)
    assert changed == 2 * 7  # every LoRA target of both layers moved, nothing else
    loaded = AutoModelForCausalLM.from_pretrained(sharded)  # transformers reads the sharded folder
    assert loaded.dtype == torch.bfloat16


def test_merged_logits_equal_base_plus_adapter(trained_run, tokenizer, memorized_chats):
    run_dir, _ = trained_run
    base_path = model_lib.resolve("tiny")
    x = prompt_ids(tokenizer, memorized_chats[0])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        unmerged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()(x).logits[0]
        saved = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()(x).logits[0]
    # weights rounded once to the base's bf16 (relative step 2^-8); logits here reach ~14.
    assert (unmerged - saved).abs().max() < 0.3
    # top-1 may flip only at near-ties on prompt positions the model never trained on
    assert (unmerged.argmax(-1) == saved.argmax(-1)).float().mean() >= 0.95
    assert AutoModelForCausalLM.from_pretrained(run_dir / "merged").dtype == torch.bfloat16


def test_adapter_records_its_base(trained_run):
    run_dir, _ = trained_run
    assert base_model_of(run_dir / "adapter") == model_lib.resolve("tiny")


def test_adapter_onto_a_mismatched_base_is_refused(trained_run, tmp_path):
    from fasttune.tiny import TINY_CONFIG, build_model

    run_dir, _ = trained_run
    other = build_model(tmp_path / "wider", dict(TINY_CONFIG, hidden_size=512, intermediate_size=1024))
    with pytest.raises(UserError, match=r"does not fit .*wider .*size mismatch for model\.layers\.0\."):
        merge(run_dir / "adapter", tmp_path / "merged", base=str(other))
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob("merged.tmp*"))


def test_adapter_options_the_merge_does_not_apply_are_refused(trained_run, tmp_path):
    import shutil

    adapter = shutil.copytree(trained_run[0] / "adapter", tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(UserError, match=r"adapter_config.json: sets use_dora"):
        merge(adapter, tmp_path / "merged", base=model_lib.resolve("tiny"))


def test_a_base_neither_here_nor_in_the_cache_is_one_line(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"nobody/no-such-model: the 16-bit base model is neither a directory nor in "
                                        r"the Hugging Face cache .*hf download nobody/no-such-model"):
        merge(trained_run[0] / "adapter", tmp_path / "merged", base="nobody/no-such-model")


def test_adapter_content_the_merge_would_leave_out_is_refused(trained_run, tmp_path):
    """A key that is not a linear layer's LoRA pair (an embedding's LoRA, a full weight), a pair
    missing its half, or a quantized base: each a one-line error, never a merge that silently differs."""
    import shutil

    from safetensors.torch import load_file, save_file

    def adapter_with(change, name):
        adapter = shutil.copytree(trained_run[0] / "adapter", tmp_path / name)
        tensors = load_file(adapter / "adapter_model.safetensors")
        change(tensors)
        save_file(tensors, adapter / "adapter_model.safetensors")
        return adapter

    extra = adapter_with(lambda t: t.update({"base_model.model.model.embed_tokens.weight": torch.zeros(4, 4)}), "extra")
    with pytest.raises(UserError, match=r"holds base_model\.model\.model\.embed_tokens\.weight, which is not a LoRA"):
        merge(extra, tmp_path / "merged", base=model_lib.resolve("tiny"))
    lone = adapter_with(lambda t: t.pop(next(k for k in sorted(t) if k.endswith("lora_B.weight"))), "lone")
    with pytest.raises(UserError, match=r"lora_A\.weight has no lora_B beside it"):
        merge(lone, tmp_path / "merged", base=model_lib.resolve("tiny"))
    quantized = shutil.copytree(model_lib.resolve("tiny"), tmp_path / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(UserError, match=r"quantized: a quantized checkpoint; the merge needs the 16-bit base"):
        merge(trained_run[0] / "adapter", tmp_path / "merged", base=str(quantized))
    assert not (tmp_path / "merged").exists()
