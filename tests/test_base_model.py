"""--model: a folder that is not a model is one line naming the file, before anything is loaded."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fasttune import UserError, base_model
from tests.conftest import MEMORIZE, model_folder, run_script


def small_weights(path):
    save_file({"w": torch.zeros(64, 64)}, str(path))
    return path


def break_config_json(folder):
    (folder / "config.json").write_text('{"model_type": "qwen2",\n "hidden_size": }')


def break_config_type(folder):
    (folder / "config.json").write_text('["qwen2"]')


def break_model_type(folder):
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')


def break_tokenizer(folder):
    (folder / "tokenizer.json").unlink()


def break_weights_missing(folder):
    (folder / "model.safetensors").unlink()


def break_weights_cut(folder):
    (folder / "model.safetensors").unlink()
    data = small_weights(folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download


def break_weights_garbage(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(b"<html>rate limited</html>")


def break_weights_directory(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()


def break_weights_huge_header(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")


def break_config_directory(folder):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def break_remote_code(folder):
    """A config whose model_type only its own Python defines: never run, refused."""
    (folder / "config.json").write_text(json.dumps({"model_type": "my-own", "auto_map": {
        "AutoConfig": "configuration_mine.MyConfig"}}))
    (folder / "configuration_mine.py").write_text("raise SystemExit('remote code ran')\n")


def break_bin_index(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model-00001-of-00002.bin").write_bytes(b"x")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))


def break_index(folder):
    (folder / "model.safetensors").unlink()
    small_weights(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("damage, message", [
    (break_config_json, r"model/config.json:2: not valid JSON \(Expecting value"),
    (break_config_type, r"model/config.json: no 'model_type' string in it"),
    (break_model_type, r"model/config.json: transformers cannot read it \(ValueError"),
    (break_tokenizer, r"has no tokenizer \(none of tokenizer.json, tokenizer.model, vocab.json\)"),
    (break_weights_missing, r"has no weights \(\*.safetensors or pytorch_model\*.bin\)"),
    (break_weights_cut, r"model/model.safetensors: cut off \(\d+ bytes, its header needs \d+\)"),
    (break_weights_garbage, r"model/model.safetensors: not a safetensors file"),
    (break_index, r"model.safetensors.index.json: names model-00002-of-00002.safetensors, which is missing"),
    (break_weights_directory, r"model/model.safetensors: not a file"),
    (break_weights_huge_header, r"model/model.safetensors: not a safetensors file"),
    (break_config_directory, r"model/config.json: cannot read it"),
    (break_remote_code, r"model/config.json: transformers cannot read it"),
    (break_bin_index, r"pytorch_model.bin.index.json: names pytorch_model-00002-of-00002.bin, which is missing"),
])
def test_a_folder_that_is_not_a_model_names_the_file(tmp_path, tiny_dir, damage, message):
    folder = model_folder(tmp_path, tiny_dir)
    assert base_model.check(str(folder)) == folder  # whole, it passes
    damage(folder)
    with pytest.raises(UserError, match=message):
        base_model.check(str(folder))


def test_a_config_its_class_refuses_is_one_line(tmp_path):
    """transformers' config classes validate on load (Phi-3: one rope factor per rotary frequency) and wrap
    the reason in their own error type: still one line naming the file, with the reason, also for --plan."""
    from fasttune.tiny import tiny_phi3_5_dir

    folder = model_folder(tmp_path, tiny_phi3_5_dir())
    values = json.loads((folder / "config.json").read_text())
    values["rope_parameters"]["long_factor"] = values["rope_parameters"]["long_factor"][:-1]
    (folder / "config.json").write_text(json.dumps(values))
    for plan in (False, True):
        with pytest.raises(UserError, match=r"model/config.json: transformers cannot read it \(ValueError: "
                                            r"`rope_parameters`'s long_factor field must have length 32, got 31\)"):
            base_model.check(str(folder), plan=plan)


def test_plan_needs_the_config_only(tmp_path, tiny_dir):
    """--plan reads config.json alone: a folder holding only that is enough (no weights, no tokenizer)."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    assert base_model.check(str(folder), plan=True) == folder
    with pytest.raises(UserError, match="has no tokenizer"):
        base_model.check(str(folder))
    for f in base_model.TOKENIZER_FILES:
        if (tiny_dir / f).exists():
            shutil.copy(tiny_dir / f, folder / f)
    with pytest.raises(UserError, match="has no weights"):
        base_model.check(str(folder))


def test_not_a_folder(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="a file, not a model directory"):
        base_model.check(str(tmp_path / "model.gguf"))
    with pytest.raises(UserError, match="has no config.json"):
        base_model.check(str(tmp_path))
    with pytest.raises(UserError, match="not in the Hugging Face cache"):  # tests run with HF_HUB_OFFLINE=1
        base_model.check("nobody/no-such-model")
    for path in ("./models/mine", str(tmp_path / "missing"), "runs/a/merged", "~/no-such-model"):
        with pytest.raises(UserError, match=r"no such directory$"):  # a path, not a hub name: no download hint
            base_model.check(path)


def test_the_recipe_refuses_it_in_one_line_before_reading_data(tmp_path, tiny_dir):
    folder = model_folder(tmp_path, tiny_dir)
    break_weights_cut(folder)
    proc = run_script("recipes/sft.py", "--model", folder, "--data", MEMORIZE, "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {folder}/model.safetensors: cut off")
    assert not (tmp_path / "run").exists()


def test_a_partly_cached_hub_model_says_how_to_complete_it(tmp_path, tiny_dir, monkeypatch):
    """A snapshot holding config.json alone (offline): enough for --plan, and a download hint otherwise."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--small" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    shutil.copy(tiny_dir / "config.json", snapshot / "config.json")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert base_model.check("someone/small", plan=True) == snapshot
    with pytest.raises(UserError, match=r"only partly in the Hugging Face cache.*`hf download someone/small`"):
        base_model.check("someone/small")
