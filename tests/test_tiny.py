"""The tiny models' tokenizers are the real ones: llama.cpp's own test vectors agree."""

from fasttune.tiny import llama_cpp_file


def load_vectors(vocab: str):
    sep = "\n__ggml_vocab_test__\n"
    texts = llama_cpp_file(f"models/ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split(sep)
    outs = llama_cpp_file(f"models/ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(t) for t in out.split()]) for text, out in zip(texts, outs, strict=True)]


def mismatches(tokenizer, vectors):
    return [(text, want, tokenizer.encode(text, add_special_tokens=False)) for text, want in vectors
            if tokenizer.encode(text, add_special_tokens=False) != want]


def test_llama_cpp_qwen2_vectors(tokenizer):
    vectors = load_vectors("qwen2")
    assert len(vectors) == 47
    assert not mismatches(tokenizer, vectors), mismatches(tokenizer, vectors)[:3]


def test_llama_cpp_llama3_vectors():
    """The Llama 3 tokenizer rebuilt from llama.cpp's vocab file (split pattern, whole-word hits, BOS)."""
    from transformers import AutoTokenizer

    from fasttune.tiny import llama3_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(llama3_tokenizer_dir())
    vectors = load_vectors("llama-bpe")
    assert len(vectors) == 47
    assert not mismatches(tokenizer, vectors), mismatches(tokenizer, vectors)[:3]
    assert tokenizer.encode("hi") == [128000, 6151]  # <|begin_of_text|> in front, as Llama 3's does
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|eot_id|>", "<|finetune_right_pad_id|>")


def test_llama_cpp_phi3_vectors():
    """The Phi-3 tokenizer rebuilt from llama.cpp's vocab file: its SentencePiece model and its fast
    tokenizer agree with llama.cpp's test vectors, and with llama.cpp itself on chat texts (special
    tokens, the whitespace they take, spaces after them), where transformers' LlamaTokenizer would not."""
    import json

    import llama_cpp
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer, LlamaTokenizer

    from fasttune.tiny import PHI3_VOCAB_GGUF, phi3_tokenizer_dir

    folder = phi3_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vectors = load_vectors("phi-3")
    assert len(vectors) == 47
    assert not mismatches(tokenizer, vectors), mismatches(tokenizer, vectors)[:3]
    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert [text for text, want in vectors if sp.encode(text) != want] == []
    assert len(tokenizer) == 32011 and tokenizer.convert_tokens_to_ids(["<|end|>", "<|user|>"]) == [32007, 32010]
    assert tokenizer.encode("hi") == [7251]  # Phi-3.5 adds no BOS
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    # the reason for that class: loaded as LlamaTokenizer, the same files lose SentencePiece's normalizer
    assert mismatches(LlamaTokenizer.from_pretrained(folder), vectors)

    chats = [[{"role": "user", "content": user}, {"role": "assistant", "content": answer}] for user, answer in [
        ("Hello", "Hi there."), (" a leading space", "  two of them"), ("tabs\tand  double  spaces", "x  y"),
        ("line\n\nbreaks\n", "\nstarts with a newline"), ("数字 123 4567", "🦙 llama"),
        ("<not special>", "a<|end|>b"), ("a</s> b", "</s>\nx")]]
    chats.append([{"role": "system", "content": " Be brief. "}] + chats[0])
    chats.append([{"role": "user", "content": "What next?"}])  # a prompt, as chat renders it
    llm = llama_cpp.Llama(str(llama_cpp_file(PHI3_VOCAB_GGUF)), vocab_only=True, verbose=False)
    try:
        for chat in chats:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=len(chat) == 1)
            assert tokenizer.encode(text, add_special_tokens=False) == llm.tokenize(text.encode(), add_bos=False,
                                                                                     special=True), text
    finally:
        llm.close()


def test_special_tokens(tokenizer):
    assert len(tokenizer) == 151936
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == 151643 != tokenizer.eos_token_id  # pad is never the trained stop token


def test_tiny_model_shape(tiny_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (256, 2, 2)
    assert cfg.hidden_size % 256 == 0 and cfg.intermediate_size % 256 == 0  # k-quants apply
    assert cfg.tie_word_embeddings
