"""Model families other than Qwen2.5, through the same commands: a recipe run on the family's tiny
checkpoint (its real tokenizer), exported, checked against the merged model, chatted with, evaluated."""

import json
import shutil

import pytest

from fasttune import chat_formats, gguf_file
from tests.conftest import MEMORIZE, greedy_agrees, model_folder, run_script


def test_qwen3_recipe_end_to_end(tmp_path, memorized_chats):
    """Qwen3: trained on plain answers (no reasoning), served without thinking everywhere: merged/, the
    GGUF and its Modelfile carry the served template; the file answers like the merged model and stops."""
    from transformers import AutoTokenizer

    from fasttune.chat import IGNORE, tokenize_chat

    out = tmp_path / "qwen3"
    proc = run_script("recipes/clinical_qa.py", "--model", "tiny-qwen3", "--data", MEMORIZE, "--eval-data", MEMORIZE,
                      "--out", out, "--epochs", "40", "--lora_r", "16", "--learning_rate", "3e-3", "--quants", "q8_0",
                      "--max_new_tokens", "64", "--lora_gguf", "true")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert tokenizer.chat_template == chat_formats.QWEN3_SERVED
    # the mask on a two-turn conversation, with the family's own tokenizer: the answers and their
    # <|im_end|>, not the empty reasoning block the template writes before the last one
    messages = [*memorized_chats[0].messages, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    ids, labels = tokenize_chat(tokenizer, messages)
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE]) == (
        memorized_chats[0].messages[-1]["content"] + "<|im_end|>Yes.<|im_end|>")
    assert tokenizer.decode(ids).count("<think>\n\n</think>\n\n") == 1
    file = gguf_file.read(out / "gguf" / "qwen3-q8_0.gguf")
    assert file.fields["general.architecture"] == "qwen3"
    assert file.fields["tokenizer.chat_template"] == chat_formats.QWEN3_SERVED
    assert chat_formats.chat_format(chat_formats.QWEN3_SERVED).ollama in (out / "gguf" / "Modelfile.qwen3-q8_0").read_text()
    # the base model under the run's template: the GGUF LoRA pair is prompted as the run was trained
    base = gguf_file.read(out / "gguf" / "lora" / "base-q8_0.gguf")
    assert base.fields["tokenizer.chat_template"] == chat_formats.QWEN3_SERVED
    rows = json.loads((out / "gguf" / "report.json").read_text())["files"]
    assert {r["file"] for r in rows} == {"qwen3-q8_0.gguf", "base-q8_0.gguf + qwen3-lora.gguf"}
    for row in rows:
        assert row["tokenization_identical"] and row["chat_finish_reason"] == "stop" and greedy_agrees(row)
        assert row["score"] > 90 and row["stopped"] == 1.0  # the four memorised answers, each stopping by itself
    assert "qwen3-q8_0.gguf" in proc.stdout and "[stopped]" in proc.stdout


# another template of a family the tests build a checkpoint for: (tiny checkpoint, template, architecture, end of turn)
VARIANTS = {
    "qwen3-2507": ("tiny_qwen3_dir", "QWEN3_2507_TEMPLATE", "qwen3", "<|im_end|>"),  # Qwen3-Instruct-2507: no thinking
    "llama3.1": ("tiny_llama3_2_dir", "LLAMA3_1_TEMPLATE", "llama", "<|eot_id|>"),  # Llama 3.1-Instruct: a fixed date
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_family_s_other_template_end_to_end(tmp_path, memorized_chats, variant):
    """A checkpoint given as a directory whose tokenizer ships another template of its family: the run
    serves that template as is (neither writes a reasoning block or today's date), the loss is on each
    answer and its end-of-turn token, the GGUF's Modelfile gets its Go template, and the file answers
    like the merged model and stops."""
    import shutil

    from transformers import AutoTokenizer

    from fasttune import tiny
    from fasttune.chat import IGNORE, tokenize_chat

    checkpoint, template_name, architecture, end = VARIANTS[variant]
    template = getattr(chat_formats, template_name)
    model = tmp_path / variant
    shutil.copytree(getattr(tiny, checkpoint)(), model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model)
    out = tmp_path / "run"
    proc = run_script("recipes/clinical_qa.py", "--model", model, "--data", MEMORIZE, "--eval-data", MEMORIZE, "--out", out,
                      "--epochs", "40", "--lora_r", "16", "--learning_rate", "3e-3", "--quants", "q8_0",
                      "--max_new_tokens", "64")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert tokenizer.chat_template == template
    messages = [*memorized_chats[0].messages, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    ids, labels = tokenize_chat(tokenizer, messages)
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE]) == (
        f"{memorized_chats[0].messages[-1]['content']}{end}Yes.{end}")
    assert "<think>" not in tokenizer.decode(ids)
    file = gguf_file.read(out / "gguf" / "run-q8_0.gguf")
    assert file.fields["general.architecture"] == architecture
    assert file.fields["tokenizer.chat_template"] == template
    modelfile = (out / "gguf" / "Modelfile.run-q8_0").read_text()
    assert chat_formats.chat_format(template).ollama in modelfile and f'PARAMETER stop "{end}"' in modelfile
    [row] = json.loads((out / "gguf" / "report.json").read_text())["files"]
    assert row["tokenization_identical"] and row["chat_finish_reason"] == "stop" and greedy_agrees(row)
    assert row["score"] > 90 and row["stopped"] == 1.0
    assert "run-q8_0.gguf" in proc.stdout


def test_llama3_2_recipe_end_to_end(tmp_path, memorized_chats):
    """Llama 3.2: trained and served under a fixed date (the template would write today's), answers end at
    <|eot_id|>; the GGUF carries the llama-bpe tokenizer and answers like the merged model."""
    from transformers import AutoTokenizer

    from fasttune.chat import IGNORE, tokenize_chat

    out = tmp_path / "llama"
    proc = run_script("recipes/clinical_qa.py", "--model", "tiny-llama3.2", "--data", MEMORIZE, "--eval-data",
                      MEMORIZE, "--out", out, "--epochs", "40", "--lora_r", "16", "--learning_rate", "3e-3",
                      "--quants", "q8_0", "--max_new_tokens", "64")
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert tokenizer.chat_template == chat_formats.LLAMA3_2_SERVED
    messages = [*memorized_chats[0].messages, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    ids, labels = tokenize_chat(tokenizer, messages)
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE]) == (
        memorized_chats[0].messages[-1]["content"] + "<|eot_id|>Yes.<|eot_id|>")
    assert "Today Date: 26 Jul 2024" in tokenizer.decode(ids) and ids.count(128000) == 1  # one <|begin_of_text|>
    file = gguf_file.read(out / "gguf" / "llama-q8_0.gguf")
    assert (file.fields["general.architecture"], file.fields["tokenizer.ggml.pre"]) == ("llama", "llama-bpe")
    assert file.fields["tokenizer.chat_template"] == chat_formats.LLAMA3_2_SERVED
    assert chat_formats.OLLAMA_LLAMA3_2 in (out / "gguf" / "Modelfile.llama-q8_0").read_text()
    row = json.loads((out / "gguf" / "report.json").read_text())["files"][0]
    assert row["tokenization_identical"] and row["chat_finish_reason"] == "stop" and greedy_agrees(row)
    assert row["score"] > 90 and row["stopped"] == 1.0
    assert "[stopped]" in proc.stdout


def test_phi3_5_recipe_end_to_end(tmp_path, memorized_chats):
    """Phi-3.5-mini: LoRA on its fused projections, the loss on each answer and its <|end|> (the newline
    after it is folded into the token), a SentencePiece GGUF that tokenizes as transformers does, answers
    like the merged model and stops; the GGUF LoRA pair too; the Modelfile pins the original context."""
    from transformers import AutoTokenizer

    from fasttune.chat import IGNORE, tokenize_chat

    out = tmp_path / "phi"
    proc = run_script("recipes/clinical_qa.py", "--model", "tiny-phi3.5", "--data", MEMORIZE, "--eval-data", MEMORIZE,
                      "--out", out, "--epochs", "40", "--lora_r", "16", "--learning_rate", "3e-3", "--quants", "q8_0",
                      "--max_new_tokens", "64", "--lora_gguf", "true")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert (out / "merged" / "tokenizer.model").is_file()  # the GGUF's token scores come from it
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert tokenizer.chat_template == chat_formats.PHI3_5_TEMPLATE
    answer = memorized_chats[0].messages[-1]["content"]
    messages = [*memorized_chats[0].messages, {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    ids, labels = tokenize_chat(tokenizer, messages)
    assert [i for i, label in zip(ids, labels) if label != IGNORE] == (
        tokenizer.encode(answer + "<|end|>") + tokenizer.encode("Yes.<|end|>"))
    assert tokenizer.decode(ids).count("<|end|>") == 5 and ids[0] == tokenizer.convert_tokens_to_ids("<|system|>")
    file = gguf_file.read(out / "gguf" / "phi-q8_0.gguf")
    assert (file.fields["general.architecture"], file.fields["tokenizer.ggml.model"]) == ("phi3", "llama")
    assert "phi3" in file.fields["general.name"] and file.fields["tokenizer.ggml.add_bos_token"] is False
    modelfile = (out / "gguf" / "Modelfile.phi-q8_0").read_text()
    assert chat_formats.OLLAMA_PHI3_5 in modelfile and 'PARAMETER stop "<|end|>"' in modelfile
    assert "PARAMETER num_ctx 4096" in modelfile
    rows = json.loads((out / "gguf" / "report.json").read_text())["files"]
    assert {r["file"] for r in rows} == {"phi-q8_0.gguf", "base-q8_0.gguf + phi-lora.gguf"}
    for row in rows:
        assert row["tokenization_identical"] and row["chat_finish_reason"] == "stop" and greedy_agrees(row)
        assert row["score"] > 90 and row["stopped"] == 1.0
    assert "[stopped]" in proc.stdout


@pytest.mark.parametrize("case", ["architecture", "sentencepiece", "lora part"])
def test_a_checkpoint_the_converter_cannot_write_is_refused_before_any_weight_is_loaded(tmp_path, tiny_dir, case):
    """An architecture outside the table (here a Qwen2 checkpoint that says MistralForCausalLM), a
    Llama-architecture checkpoint with a SentencePiece tokenizer (Phi-3's: as Llama 2, TinyLlama or a
    llamafied Mistral or Phi-3 ship), which the architecture alone let train to the end and fail at
    export, and LoRA on part of a fused layer (Phi-3's q_proj): one line, exit 2, nothing written."""
    from fasttune.tiny import phi3_tokenizer_dir, tiny_llama3_2_dir, tiny_phi3_5_dir

    flags = []
    if case == "lora part":
        folder = model_folder(tmp_path, tiny_phi3_5_dir())
        flags, want = ["--lora_target_modules", "q_proj"], "in one layer, qkv_proj; name all of them or qkv_proj"
    elif case == "architecture":
        folder = model_folder(tmp_path, tiny_dir)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(config, architectures=["MistralForCausalLM"])))
        want = ("architecture MistralForCausalLM is not supported (Mistral's GGUF, with its v3 SentencePiece "
                "vocabulary and [INST] control tokens, is not written yet); supported: Qwen2ForCausalLM")
    else:
        folder = model_folder(tmp_path, tiny_llama3_2_dir())
        for f in phi3_tokenizer_dir().glob("*"):  # Phi-3's tokenizer files over Llama 3's
            shutil.copy(f, folder / f.name)
        want = "pre-tokenizer is not one fasttune knows"
    proc = run_script("recipes/clinical_qa.py", "--model", folder, "--data", MEMORIZE, "--out", tmp_path / "run",
                      "--epochs", "1", *flags, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --lora_target_modules: " if flags else f"error: {folder}: ") and want in last, last
    assert not (tmp_path / "run").exists()
