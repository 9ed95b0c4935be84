"""Merging: base (16-bit, reloaded) + adapter, merged, gives the same logits as the two unmerged."""

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fasttune import model as model_lib
from fasttune.merge import base_model_of, load_merged


def prompt_ids(tokenizer, chat):
    out = tokenizer.apply_chat_template(chat.messages[:-1], add_generation_prompt=True, return_dict=True)
    return torch.tensor([list(out["input_ids"])])


def test_merged_logits_equal_base_plus_adapter(trained_run, tokenizer, memorized_chats):
    run_dir, _ = trained_run
    base_path = model_lib.resolve("tiny")
    x = prompt_ids(tokenizer, memorized_chats[0])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        unmerged = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()(x).logits[0]
        merged32, _ = load_merged(run_dir / "adapter", base_path)
        in_memory = merged32.eval()(x).logits[0]
        saved = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()(x).logits[0]

    # float32 merge: only summation order differs.
    assert (unmerged - in_memory).abs().max() < 1e-3
    # saved merge: weights rounded once to the base's bf16 (relative step 2^-8); logits here reach ~14.
    assert (unmerged - saved).abs().max() < 0.3
    # top-1 may flip only at near-ties on prompt positions the model never trained on
    assert (unmerged.argmax(-1) == saved.argmax(-1)).float().mean() >= 0.95
    assert AutoModelForCausalLM.from_pretrained(run_dir / "merged").dtype == torch.bfloat16


def test_adapter_records_its_base(trained_run):
    run_dir, _ = trained_run
    assert base_model_of(run_dir / "adapter") == model_lib.resolve("tiny")


def test_adapter_onto_a_mismatched_base_is_refused(trained_run, tmp_path):
    import pytest

    from fasttune import UserError
    from fasttune.tiny import TINY_CONFIG, build_model

    run_dir, _ = trained_run
    other = build_model(tmp_path / "wider", dict(TINY_CONFIG, hidden_size=512, intermediate_size=1024))
    with pytest.raises(UserError, match=r"does not fit .*wider .*size mismatch"):
        load_merged(run_dir / "adapter", str(other))
