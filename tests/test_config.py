"""Config precedence: defaults < recipe defaults < YAML < command line; unknown keys are errors."""

import pytest

from fasttune import UserError
from fasttune.config import create_run_dir, load_run, parse

REQUIRED = ["--model", "tiny", "--data", "d.jsonl", "--out", "runs/x"]


def test_defaults_are_the_first_users_setup():
    cfg = parse(REQUIRED)
    assert cfg.model.load_in_4bit and cfg.model.lora_r == 64 and cfg.model.lora_alpha == 16
    assert cfg.model.lora_dropout == 0.1 and len(cfg.model.lora_target_modules) == 7
    assert (cfg.train.learning_rate, cfg.train.epochs, cfg.train.lr_scheduler) == (2e-4, 3.0, "constant")
    assert (cfg.train.warmup_ratio, cfg.train.max_grad_norm, cfg.train.weight_decay) == (0.03, 0.3, 0.001)
    assert cfg.model.max_seq_length == 1024


def test_yaml_overrides_recipe_defaults_and_cli_overrides_yaml(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("lora_r: 8\nlearning_rate: 1e-4\nsystem_prompt: from yaml\n")
    cfg = parse(REQUIRED + ["--config", str(yml)], defaults={"system_prompt": "recipe", "lora_r": 32})
    assert cfg.model.lora_r == 8 and cfg.train.learning_rate == 1e-4  # "1e-4" in YAML is a string; still a float
    assert cfg.data.system_prompt == "from yaml"
    cfg = parse(REQUIRED + ["--config", str(yml), "--lora_r", "4", "--eval-data", "e.jsonl"])
    assert cfg.model.lora_r == 4 and cfg.data.eval_data == "e.jsonl"


def test_flags(tmp_path):
    cfg = parse(REQUIRED + ["--no-4bit", "--quants", "q8_0", "q4_k_m"])
    assert not cfg.model.load_in_4bit and cfg.export.quants == ["q8_0", "q4_k_m"]
    assert parse(REQUIRED + ["--quants", "none"]).export.quants == []


def test_warmup_ratio_must_be_a_fraction():
    with pytest.raises(UserError, match="warmup_ratio 3.0"):
        parse(REQUIRED + ["--warmup_ratio", "3"])


def test_unknown_yaml_key_is_an_error(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("lora_rank: 8\n")
    with pytest.raises(UserError, match="unknown keys: lora_rank"):
        parse(REQUIRED + ["--config", str(yml)])


def test_unknown_flag_is_a_usage_error():
    with pytest.raises(UserError, match="unknown arguments: --lora_rank 8"):
        parse(REQUIRED + ["--lora_rank", "8"])


def test_run_dir_round_trip(tmp_path):
    cfg = parse(["--model", "tiny", "--data", "d.jsonl", "--out", str(tmp_path / "run"), "--lora_r", "8", "--metric",
                 "numeric"],
                prog="recipes/clinical_calculator.py")
    run = create_run_dir(cfg)
    assert load_run(run) == cfg and cfg.recipe == "clinical_calculator" and cfg.eval.metric == "numeric"
    # a run's own config.yaml is a valid --config (its `recipe` key is not a flag)
    again = parse(["--config", str(run / "config.yaml")], prog="recipes/clinical_calculator.py")
    assert again.flat() == cfg.flat()
    with pytest.raises(UserError, match="--overwrite"):
        create_run_dir(cfg)


def test_model_data_and_out_are_required_except_for_plan():
    with pytest.raises(UserError, match=r"^--model required: .* --model tiny for a dry run"):
        parse(["--data", "d.jsonl", "--out", "o"])  # no silent toy model
    with pytest.raises(UserError, match=r"--data and --out required"):
        parse(["--model", "tiny"])
    with pytest.raises(UserError, match=r"^--out required"):
        parse(["--model", "tiny", "--data", "d.jsonl"])
    assert parse(["--model", "tiny", "--plan"]).train.plan
