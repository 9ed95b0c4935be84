"""Config precedence: defaults < recipe defaults < YAML < command line; unknown keys are errors."""

import os

import pytest

from fasttune import UserError
from fasttune.config import create_run_dir, load_run, parse

REQUIRED = ["--model", "tiny", "--data", "d.jsonl", "--out", "runs/x"]


def test_defaults_are_the_first_users_setup_on_unsloths_plain_lora_path():
    cfg = parse(REQUIRED)
    # the QLoRA guide's r, but alpha = r and no dropout (bench/lora_defaults.py measured why)
    assert cfg.model.load_in_4bit and cfg.model.lora_r == 64 and cfg.model.lora_alpha == 64
    assert cfg.model.lora_dropout == 0.0 and len(cfg.model.lora_target_modules) == 7
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


@pytest.mark.parametrize("text, message", [
    ("lora_rank: 8\n", r"c.yaml:1: unknown key 'lora_rank'; --help lists every field"),
    ("epochs: 1\nenv:\n  HF_ENDPOINT: http://evil\n", r"c.yaml:2: unknown key 'env' \(environment variables are not set"),
    ("epochs: three\n", r"c.yaml:1: key 'epochs': expected a number, got a string \('three'\)"),
    ("lora_r: 8.5\n", r"c.yaml:1: key 'lora_r': expected a whole number, got a number"),
    ("quants: q4_k_m\n", r"c.yaml:1: key 'quants': expected a list of strings, e.g. \[a, b\], got a string"),
    ("packing: [1]\n", r"c.yaml:1: key 'packing': expected true or false, got a list"),
    ("- epochs\n", r"c.yaml: a config file is a flat mapping of fields \(epochs: 3\), got a list"),
    ("epochs: [1\n", r"c.yaml:2: not valid YAML"),
])
def test_bad_yaml_is_one_line_naming_file_line_and_key(tmp_path, text, message):
    yml = tmp_path / "c.yaml"
    yml.write_text(text)
    environ = dict(os.environ)
    with pytest.raises(UserError, match=message):
        parse(REQUIRED + ["--config", str(yml)])
    assert dict(os.environ) == environ  # nothing leaked into the environment


def test_yaml_numbers_as_people_write_them(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("learning_rate: 1e-4\nepochs: 2\n")  # YAML 1.1 reads 1e-4 as text; 2 as an int
    cfg = parse(REQUIRED + [f"--config={yml}"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.epochs == 2


@pytest.mark.parametrize("flags, message", [
    (["--user_template", "Q: {a"], r"--user_template 'Q: {a': .*; write {{ and }} for a literal brace"),
    (["--assistant_template", "A} "], r"--assistant_template 'A} ': Single '}'"),
    (["--epochs", "0"], r"--epochs 0.0: must be above 0"),
    (["--logging_steps", "0"], r"--logging_steps 0: must be above 0"),
    (["--config"], r"--config needs a file name"),
    (["--system_prompt", 'Say """hi"""'], r'--system_prompt contains """, which would end the SYSTEM block'),
    (["--config", "missing.yaml"], r"--config missing.yaml: no such file"),
])
def test_bad_flags_fail_before_anything_runs(flags, message):
    with pytest.raises(UserError, match=message):
        parse(REQUIRED + flags)


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


def test_out_that_is_not_a_run_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.yaml").write_text("name: my other project\n")  # a config.yaml, but not fasttune's
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for extra in ([], ["--overwrite"]):
        with pytest.raises(UserError, match=r"not a fasttune run \(it holds config.yaml, merged, notes.txt\); nothing was changed"):
            create_run_dir(parse(REQUIRED[:4] + ["--out", str(tmp_path), *extra]))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_the_whole_run(tmp_path):
    run = tmp_path / "run"
    for old in ("config.yaml", "run.json", "adapter/adapter_model.safetensors", "merged/model.safetensors",
                "gguf/run-q4_k_m.gguf", "eval/report.md", "data/train.jsonl", "notes.txt"):
        (run / old).parent.mkdir(parents=True, exist_ok=True)
        (run / old).write_text("old")
    create_run_dir(parse(REQUIRED[:4] + ["--out", str(run), "--overwrite"]))
    # no file of the old run left; what the user put there themselves is not fasttune's to delete
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "notes.txt"]
    assert "old" not in (run / "config.yaml").read_text()


def test_out_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"--out .*/file/run: cannot create it \(Not a directory\)"):
        create_run_dir(parse(REQUIRED[:4] + ["--out", str(tmp_path / "file" / "run")]))


def test_lora_alpha_follows_r_unless_given_and_bad_values_are_one_line_errors(tmp_path):
    assert parse(REQUIRED + ["--lora_r", "32"]).model.lora_alpha == 32
    assert parse(REQUIRED + ["--lora_r", "64", "--lora_alpha", "16", "--lora_dropout", "0.1"]).model.lora_alpha == 16
    yml = tmp_path / "c.yaml"
    yml.write_text("lora_r: 8\nlora_alpha: null\n")
    cfg = parse(REQUIRED + ["--config", str(yml)])
    assert cfg.model.lora_alpha == 8
    cfg.save(tmp_path / "config.yaml")  # a run records the value it trained with
    assert "lora_alpha: 8\n" in (tmp_path / "config.yaml").read_text()
    for flags, message in ((["--lora_alpha", "0"], "--lora_alpha 0: must be above 0"),
                           (["--lora_dropout", "1"], "--lora_dropout 1.0: must be 0 <= p < 1")):
        with pytest.raises(UserError, match=message):
            parse(REQUIRED + flags)


def test_lora_targets_name_fused_layers_for_their_parts():
    """Phi-3 computes q/k/v in qkv_proj and gate/up in gate_up_proj: the default's seven projections are its
    four layers; a part alone, or a name the model lacks (PEFT would skip it silently), is one line."""
    from fasttune.config import LORA_TARGETS, lora_targets

    qwen = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    phi3 = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert lora_targets(LORA_TARGETS, qwen) == LORA_TARGETS
    assert lora_targets(LORA_TARGETS, phi3) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora_targets(["q_proj", "v_proj", "k_proj"], phi3) == ["qkv_proj"]
    assert lora_targets(["qkv_proj", "down_proj"], phi3) == ["qkv_proj", "down_proj"]
    with pytest.raises(UserError, match="computes q_proj, k_proj, v_proj in one layer, qkv_proj; name all of them"):
        lora_targets(["q_proj", "v_proj"], phi3)
    with pytest.raises(UserError, match="no layer named qkv_proj that LoRA can adapt; its linear layers: down_proj, gate"):
        lora_targets(["qkv_proj"], qwen)
    with pytest.raises(UserError, match="no layer named q_prj"):
        lora_targets(["q_prj", "v_proj"], qwen)
    # the default on a family with other names (Phi-2's dense, fc1, fc2): the ones it has, none is an error
    assert lora_targets(LORA_TARGETS, {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}) == ["q_proj", "k_proj", "v_proj"]
    with pytest.raises(UserError, match="no layer named q_proj"):
        lora_targets(LORA_TARGETS, {"query_key_value", "dense"})
