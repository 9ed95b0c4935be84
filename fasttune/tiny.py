"""The tiny models used by the demo, the tests and the benchmarks: Qwen2.5's (`--model tiny`), Qwen3's
(`--model tiny-qwen3`), Llama 3.2's (`--model tiny-llama3.2`) and Phi-3.5-mini's (`--model tiny-phi3.5`).

Each has its family's real vocabulary and merges (Qwen2's 151,936 rows, Qwen3 adding its tool-response
and reasoning tokens at Qwen3's ids; llama.cpp's Qwen2 vocab file lacks the other added tokens,
<tool_call> and the FIM ones; Llama 3's 128,256; Phi-3's SentencePiece 32,064) and shape rules (GQA;
Qwen2.5's q/k/v biases, Qwen3's q/k norms and 128-wide heads, Llama 3's rope scaling; tied embeddings;
Phi-3's fused projections and long-context rope factors), but only 2 layers of width 256 and random
weights: its words mean nothing.
Widths are multiples of 256 so llama.cpp's k-quants really apply (at 64 every tensor falls back).

The tokenizers come from the llama-cpp-python sdist, which ships llama.cpp's vocab-only
`ggml-vocab-*.gguf` files and their tokenizer test vectors; no model hub is needed. Everything is built
once and cached under $FASTTUNE_CACHE (default ~/.cache/fasttune).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
SDIST_ROOT = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
VOCAB_GGUF = "models/ggml-vocab-qwen2.gguf"
LLAMA3_VOCAB_GGUF = "models/ggml-vocab-llama-bpe.gguf"
PHI3_VOCAB_GGUF = "models/ggml-vocab-phi-3.gguf"

# Qwen2.5-0.5B's hyper-parameters where they do not cost compute; DESIGN.md section 4 for widths.
TINY_CONFIG = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151645,
    # Larger than Qwen's 0.02 so that random logits have clear winners: greedy decoding then
    # does not hinge on ties, which makes HF-vs-GGUF comparisons meaningful.
    initializer_range=0.1,
)

# A Qwen2.5-0.5B-shaped model: same compute as the real one, used for speed benchmarks.
QWEN2_5_0_5B_CONFIG = dict(
    TINY_CONFIG,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    initializer_range=0.02,
)


# Qwen3-0.6B's hyper-parameters where they do not cost compute: heads 128 wide whatever the width (so
# attention is 512 wide here, not 256), q/k RMS norms, no biases.
TINY_QWEN3_CONFIG = dict(
    TINY_CONFIG,
    model_type="qwen3",
    head_dim=128,
    max_position_embeddings=40960,
)
# Llama-3.2-1B's shape rules where they do not cost compute: llama3 rope scaling, 64-wide heads, tied
# embeddings, no biases.
TINY_LLAMA3_2_CONFIG = dict(
    model_type="llama",
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128009,
    initializer_range=0.1,  # as TINY_CONFIG: clear winners for greedy comparisons
)
# Phi-3.5-mini-instruct's shape rules where they do not cost compute: q/k/v fused in one projection and
# gate/up in another (transformers' Phi3 layout), no biases, an untied head, longrope scaling from a 4k
# original context to 128k with a factor per rotary frequency (made-up ramps here, the long ones far from
# the short ones so that the two sets give different logits), and its sliding window, wider than any context.
TINY_PHI3_5_CONFIG = dict(
    model_type="phi3",
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32064,
    tie_word_embeddings=False,
    max_position_embeddings=131072,
    original_max_position_embeddings=4096,
    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                     "long_factor": [round(1.0 + 0.37 * i, 4) for i in range(32)],
                     "short_factor": [round(1.0 + 0.011 * i, 4) for i in range(32)]},
    sliding_window=262144,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=32000,
    pad_token_id=32000,
    initializer_range=0.1,
)
# Qwen3's added tokens beyond Qwen2.5's (ids 151665-151668, in this order), plain text to its tokenizer
QWEN3_ADDED_TOKENS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]


def cache_dir() -> Path:
    path = Path(os.environ.get("FASTTUNE_CACHE", Path.home() / ".cache" / "fasttune"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def llama_cpp_sdist() -> Path:
    """The llama-cpp-python source archive (downloaded from the package registry once)."""
    folder = cache_dir() / "sdist"
    found = sorted(folder.glob("llama_cpp_python-0.3.36.tar.gz"))
    if found:
        return found[0]
    logger.info("downloading the %s source archive (for the Qwen2 vocab and llama.cpp's converter)", LLAMA_CPP_SDIST)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         LLAMA_CPP_SDIST, "-d", str(folder)],
        check=True,
    )
    return llama_cpp_sdist()


def llama_cpp_file(relpath: str) -> Path:
    """A file or folder from the sdist's vendor/llama.cpp tree, extracted once into the cache."""
    dest = cache_dir() / "llama.cpp" / relpath
    if dest.exists():
        return dest
    with tarfile.open(llama_cpp_sdist()) as tar, tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        prefix = SDIST_ROOT + relpath
        members = [m for m in tar.getmembers() if m.name == prefix or m.name.startswith(prefix + "/")]
        if not members:
            raise FileNotFoundError(f"{relpath} is not in {LLAMA_CPP_SDIST}")
        tar.extractall(tmp, members=members, filter="data")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / prefix, dest)
    return dest


def atomic_build(dest: Path, build, recipe: dict | None = None) -> Path:
    """Run build(tmp_dir), then move tmp_dir to dest, so a killed build leaves no half cache.

    `recipe` (what the build depends on: settings, library versions) is stored beside the result; a
    cached copy built from another recipe is built again, so a changed config or torch never leaves
    the tests on stale weights.
    """
    import json

    stamp = json.dumps(recipe or {}, sort_keys=True)
    if dest.exists():
        built = dest / "fasttune-build.json"
        if not recipe or (built.is_file() and built.read_text() == stamp):
            return dest
        logger.info("rebuilding %s: it was built from other settings or library versions", dest)
        stale = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".stale"))
        try:  # moved aside, then removed: another process may be doing the same
            os.replace(dest, stale / "old")
        except FileNotFoundError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp"))
    try:
        build(tmp)
        (tmp / "fasttune-build.json").write_text(stamp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process built it meanwhile: keep theirs
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def qwen2_tokenizer_dir() -> Path:
    """A saved Qwen2 tokenizer (tokenizer.json + config) with Qwen2.5's chat template."""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        from fasttune.chat_formats import QWEN2_5_TEMPLATE

        vocab = llama_cpp_file(VOCAB_GGUF)
        logger.info("building the Qwen2 tokenizer from %s (about 20 s, once)", vocab.name)
        tok = AutoTokenizer.from_pretrained(str(vocab.parent), gguf_file=vocab.name)
        # Qwen2.5-Instruct's special-token roles: <|im_end|> ends a turn, <|endoftext|> pads.
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|endoftext|>"
        tok.chat_template = QWEN2_5_TEMPLATE
        tok.save_pretrained(tmp)

    return atomic_build(cache_dir() / "qwen2-tokenizer", build, _tokenizer_recipe())


def qwen3_tokenizer_dir() -> Path:
    """A saved Qwen3 tokenizer: Qwen2's vocabulary and merges, Qwen3's added tokens at Qwen3's ids, its own
    chat template. (llama.cpp's vocab file fills the ids past Qwen2's last token with [PAD<id>] entries:
    four of them become Qwen3's tokens, edited in tokenizer.json, where transformers has no API for it.)"""

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        from fasttune.chat_formats import QWEN3_TEMPLATE

        source = qwen2_tokenizer_dir()
        spec = json.loads((source / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        for token_id, token in enumerate(QWEN3_ADDED_TOKENS, start=151665):
            del vocab[f"[PAD{token_id}]"]
            vocab[token] = token_id
            spec["added_tokens"].append({"id": token_id, "content": token, "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": False, "special": False})
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        shutil.copy(source / "tokenizer_config.json", tmp / "tokenizer_config.json")
        tok = AutoTokenizer.from_pretrained(tmp)
        tok.chat_template = QWEN3_TEMPLATE
        tok.save_pretrained(tmp)

    return atomic_build(cache_dir() / "qwen3-tokenizer", build, _tokenizer_recipe("qwen3"))


# Llama 3's tokenizer.json splits words with this pattern (a fact of the model, as llama.cpp's
# "llama-bpe" pre-tokenizer); transformers' GGUF reader puts GPT-2's in its place.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.1+'s names for ids the Llama 3 vocab file calls reserved
LLAMA3_1_TOKENS = {128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128010: "<|python_tag|>"}


def llama3_tokenizer_dir() -> Path:
    """A saved Llama 3.2 tokenizer: llama.cpp's llama-bpe vocab file (Llama 3's 128,256 tokens and merges),
    with what transformers' GGUF reader gets wrong or the file does not carry put right: Llama 3's split
    pattern, whole-word vocabulary hits before merges (`ignore_merges`), byte-level decoding,
    <|begin_of_text|> in front, 3.1's token names, and Llama 3.2-Instruct's chat template.
    tests/test_tiny.py checks it against llama.cpp's 47 test vectors."""

    def build(tmp: Path) -> None:
        from tokenizers import Regex, decoders, pre_tokenizers, processors
        from transformers import AutoTokenizer

        from fasttune.chat_formats import LLAMA3_2_TEMPLATE

        vocab = llama_cpp_file(LLAMA3_VOCAB_GGUF)
        logger.info("building the Llama 3 tokenizer from %s (about 20 s, once)", vocab.name)
        tok = AutoTokenizer.from_pretrained(str(vocab.parent), gguf_file=vocab.name)
        backend = tok.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        backend.model.ignore_merges = True
        backend.model.byte_fallback = False  # byte-level BPE: every byte is a token already
        backend.decoder = decoders.ByteLevel()  # the reader gives SentencePiece's, which strips a leading space
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", 128000)])
        tok.save_pretrained(tmp)
        spec = json.loads((tmp / "tokenizer.json").read_text())  # renaming tokens: no transformers API for it
        renamed = {t["content"]: LLAMA3_1_TOKENS[t["id"]] for t in spec["added_tokens"]
                   if t["id"] in LLAMA3_1_TOKENS}
        for entry in spec["added_tokens"]:
            entry["content"] = renamed.get(entry["content"], entry["content"])
        model_vocab = spec["model"]["vocab"]
        for old, new in renamed.items():
            model_vocab[new] = model_vocab.pop(old)
        (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        (tmp / "tokenizer_config.json").unlink()  # its added-token table still has the old names
        tok = AutoTokenizer.from_pretrained(tmp)
        tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
        tok.chat_template = LLAMA3_2_TEMPLATE
        tok.save_pretrained(tmp)

    return atomic_build(cache_dir() / "llama3-tokenizer", build, _tokenizer_recipe("llama"))


def phi3_tokenizer_dir() -> Path:
    """A saved Phi-3.5-mini tokenizer (Llama 2's SentencePiece BPE with Phi-3's added tokens), rebuilt
    from llama.cpp's phi-3 vocab file (Phi-3-mini's vocabulary, which 3.5 shares), with
    Phi-3.5-mini-Instruct's template and special tokens (no BOS added; <|endoftext|> ends and pads).

    tokenizer.model: the first 32,000 entries of the vocab file with their scores, as a SentencePiece
    model (byte fallback, a space put in front of the text; training-only fields left out).
    tokenizer.json: the same tokenizer as `tokenizers` runs it, with SentencePiece's normalizer and
    its merges in SentencePiece's order (the merged piece's score; transformers' conversion orders
    them by id, and Phi-3's 16 whitespace pieces score -1e9). Its class is PreTrainedTokenizerFast:
    transformers' LlamaTokenizer rebuilds a Metaspace pipeline on load, which writes no space after
    a special token (what a folder without a config.json, or a llamafied Phi-3, gets; a real phi3
    checkpoint loads its tokenizer.json as it is). tests/test_tiny.py checks both files against
    llama.cpp's 47 test vectors and the fast one against llama.cpp itself on chat texts."""

    def build(tmp: Path) -> None:
        import gguf
        from sentencepiece import SentencePieceProcessor
        from sentencepiece import sentencepiece_model_pb2 as spm
        from tokenizers import models, normalizers
        from transformers import AddedToken, AutoTokenizer

        from fasttune import gguf_file
        from fasttune.chat_formats import PHI3_5_TEMPLATE

        vocab_file = llama_cpp_file(PHI3_VOCAB_GGUF)
        logger.info("building the Phi-3 tokenizer from %s (about 10 s, once)", vocab_file.name)
        fields = gguf_file.read(vocab_file).fields
        tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
        proto, kind = spm.ModelProto(), spm.ModelProto.SentencePiece.Type
        for i in range(32_000):
            piece = proto.pieces.add()
            piece.piece = tokens[i]
            # the vocab file scores <unk>, <s>, </s> -1000 (as added tokens); a SentencePiece model, 0
            if i < 3:
                piece.type, piece.score = (kind.UNKNOWN if i == 0 else kind.CONTROL), 0.0
            elif types[i] == gguf.TokenType.BYTE:
                piece.type, piece.score = kind.BYTE, 0.0
            else:
                piece.type, piece.score = kind.NORMAL, scores[i]
        trainer = proto.trainer_spec
        trainer.model_type, trainer.vocab_size, trainer.byte_fallback = spm.TrainerSpec.BPE, 32_000, True
        trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
        normalizer = proto.normalizer_spec
        normalizer.name, normalizer.add_dummy_prefix = "identity", True
        normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
        (tmp / "tokenizer.model").write_bytes(proto.SerializeToString())

        (tmp / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
        tok = AutoTokenizer.from_pretrained(tmp)  # transformers converts the SentencePiece model
        backend = tok.backend_tokenizer
        converted = json.loads(backend.to_str())["model"]
        vocab, merges = converted["vocab"], [tuple(m) for m in converted["merges"]]
        score = SentencePieceProcessor(model_file=str(tmp / "tokenizer.model")).GetScore
        merges.sort(key=lambda m: (-score(vocab[m[0] + m[1]]), vocab[m[0] + m[1]]))
        backend.model = models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        backend.pre_tokenizer = None
        # Phi-3's added tokens (ids 32000-32010) but <|endoftext|>, and </s>, take the whitespace after them,
        # as llama.cpp has them for a file named phi3 (</s> not special, as Phi-3's own configuration says)
        tok.add_tokens([AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>")
                        for t in tokens[32_000:32_011]], special_tokens=True)
        tok.add_tokens([AddedToken("</s>", special=False, normalized=False, rstrip=True)])
        tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token = "<s>", "<|endoftext|>", "<unk>", "<|endoftext|>"
        tok.chat_template = PHI3_5_TEMPLATE
        tok.save_pretrained(tmp)
        config = json.loads((tmp / "tokenizer_config.json").read_text())
        # no BOS or EOS added when tokenizing, as Phi-3.5-mini-instruct's configuration says
        (tmp / "tokenizer_config.json").write_text(json.dumps(dict(
            config, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)))

    recipe = dict(_tokenizer_recipe("phi3"), rstrip="the added tokens but <|endoftext|>; </s>", add_bos=False)
    return atomic_build(cache_dir() / "phi3-tokenizer", build, recipe)


def _tokenizer_recipe(model_type: str = "qwen2") -> dict:
    from fasttune.chat_formats import LLAMA3_2_TEMPLATE, PHI3_5_TEMPLATE, QWEN2_5_TEMPLATE, QWEN3_TEMPLATE

    templates = {"qwen3": QWEN3_TEMPLATE, "llama": LLAMA3_2_TEMPLATE, "phi3": PHI3_5_TEMPLATE}
    template = templates.get(model_type, QWEN2_5_TEMPLATE)
    return dict(_versions(), sdist=LLAMA_CPP_SDIST, template=template)


# config's model_type -> its tokenizer
TOKENIZERS = {"qwen2": qwen2_tokenizer_dir, "qwen3": qwen3_tokenizer_dir, "llama": llama3_tokenizer_dir,
              "phi3": phi3_tokenizer_dir}


def build_model(dest: Path, config: dict, seed: int = 0) -> Path:
    """Save a random-weight checkpoint of config's model_type (default qwen2) with its family's real
    tokenizer to dest (bf16 safetensors)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    model_type = config.get("model_type", "qwen2")

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(seed)
        hf_config = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
        model = AutoModelForCausalLM.from_config(hf_config).to(torch.bfloat16)
        model.generation_config.eos_token_id = config["eos_token_id"]
        model.save_pretrained(tmp)
        tokenizer_dir = TOKENIZERS[model_type]()
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        if (tokenizer_dir / "tokenizer.model").is_file():  # the SentencePiece model, which a fast tokenizer does not save
            shutil.copy(tokenizer_dir / "tokenizer.model", tmp / "tokenizer.model")

    return atomic_build(dest, build, dict(_tokenizer_recipe(model_type), config=config, seed=seed))


def tiny_model_dir() -> Path:
    """The embedded tiny model, built and cached on first use (`--model tiny`)."""
    return build_model(cache_dir() / "tiny-qwen2.5", TINY_CONFIG)


def tiny_qwen3_dir() -> Path:
    """The tiny Qwen3 model, built and cached on first use (`--model tiny-qwen3`)."""
    return build_model(cache_dir() / "tiny-qwen3", TINY_QWEN3_CONFIG)


def tiny_llama3_2_dir() -> Path:
    """The tiny Llama 3.2 model, built and cached on first use (`--model tiny-llama3.2`)."""
    return build_model(cache_dir() / "tiny-llama3.2", TINY_LLAMA3_2_CONFIG)


def tiny_phi3_5_dir() -> Path:
    """The tiny Phi-3.5-mini model, built and cached on first use (`--model tiny-phi3.5`)."""
    return build_model(cache_dir() / "tiny-phi3.5", TINY_PHI3_5_CONFIG)
