"""Model families other than Qwen2.5, through the same commands: a recipe run on the family's tiny
checkpoint (its real tokenizer), exported, checked against the merged model, chatted with, evaluated."""

import json

from fasttune import chat_formats, gguf_file
from tests.conftest import MEMORIZE, greedy_agrees, run_script


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
