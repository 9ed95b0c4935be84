"""Merged Hugging Face checkpoint -> GGUF, offline, with the `gguf` package (16-bit and q8_0 files).

Why our own writer: Unsloth's `save_pretrained_gguf` downloads and builds llama.cpp, which fails
offline. The rules below are GGUF facts, checked against llama.cpp's `convert_hf_to_gguf.py`
(tests compare tensor bytes and metadata with it): 1-D tensors and norms are stored as F32, the
rest in the file's type; every tensor is read from safetensors, converted and written one at a
time, so memory stays near one tensor (a bf16 checkpoint becomes bf16 GGUF by copying bits). The
file is written under a temporary name, its header and size checked, then renamed: an interrupted
export never leaves a file under the final name. Other types: fasttune.quantize (llama.cpp).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from fasttune import UserError, cached_tokenizer

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    # llama.cpp's rotary layout for Llama checkpoints interleaves what HF keeps in two halves
    permute_qk: bool = False
    # Llama writes these two hyper-parameters; Qwen2 files do without
    write_vocab_and_rope_dims: bool = False
    # the vocabulary: "gpt2" (byte-level BPE: merges, a pre-tokenizer named by hash) or "llama"
    # (SentencePiece: per-token scores, read from the checkpoint's tokenizer.model as llama.cpp does)
    tokenizer: str = "gpt2"
    # Phi-3's hyper-parameters as llama.cpp reads them: longrope's per-frequency factors, the original
    # context, the sliding window and rotary width, and no key/value lengths
    phi3: bool = False


# Hugging Face architectures we convert. Table, not if-chain: add a row to support one.
ARCHITECTURES = {
    "Qwen2ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Arch(gguf.MODEL_ARCH.QWEN3),  # + q/k norms (gguf's name table maps them), no biases
    "LlamaForCausalLM": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True, write_vocab_and_rope_dims=True),
    # Phi-3.5-mini: q/k/v and gate/up fused (gguf's name table maps them to attn_qkv and ffn_up, as they are)
    "Phi3ForCausalLM": Arch(gguf.MODEL_ARCH.PHI3, tokenizer="llama", phi3=True),
}

# llama.cpp names a BPE pre-tokenizer by the hash of how the tokenizer splits this text (the same
# text and hashes as llama.cpp's convert_hf_to_gguf.py; add a row for another tokenizer family).
PRE_TOKENIZER_PROBE = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
PRE_TOKENIZERS = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}


def tokenizer_pre(tokenizer) -> str:
    import hashlib

    digest = hashlib.sha256(str(tokenizer.encode(PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise UserError(f"this tokenizer's pre-tokenizer is not one fasttune knows (hash {digest[:12]}...); "
                        f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")
    return PRE_TOKENIZERS[digest]


# Families asked for that the converter does not write, and why: the refusal says it. (No copy of their
# tokenizers is at hand to check a file against llama.cpp's converter, as tests/ does for every row above.)
NOT_WRITTEN = {
    "MistralForCausalLM": "Mistral's GGUF, with its v3 SentencePiece vocabulary and [INST] control tokens, is not "
                          "written yet",
    "Gemma3ForCausalLM": "Gemma 3's GGUF, with its norms, embedding scale and interleaved sliding-window attention, is "
                         "not written yet",
    "Gemma3ForConditionalGeneration": "Gemma 3's GGUF, with its norms, embedding scale and interleaved sliding-window "
                                      "attention, is not written yet (nor its vision part)",
}


def check_architecture(config, where) -> str:
    """The checkpoint's HF architecture, when this converter writes it; else the one-line refusal."""
    hf_arch = (config.architectures or ["?"])[0]
    if hf_arch not in ARCHITECTURES:
        why = f" ({NOT_WRITTEN[hf_arch]})" if hf_arch in NOT_WRITTEN else ""
        raise UserError(f"{where}: architecture {hf_arch} is not supported{why}; supported: {', '.join(ARCHITECTURES)}")
    return hf_arch


def check_convertible(model_dir: Path, tokenizer, where) -> None:
    """Refuse, in one line and before training, a checkpoint this converter cannot write: its
    architecture, a sliding window llama.cpp would not apply, or a tokenizer it cannot store: a byte-level
    BPE one whose pre-tokenizer it does not know, or a SentencePiece one under an architecture whose
    files hold BPE (`LlamaForCausalLM` holds Llama 2, TinyLlama and llamafied Mistral or Phi-3)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    arch = ARCHITECTURES[check_architecture(config, where)]
    _check_sliding_window(config, where)
    if arch.tokenizer == "llama":
        if not (Path(model_dir) / "tokenizer.model").is_file():
            raise UserError(f"{where}: no tokenizer.model; {config.architectures[0]}'s GGUF takes its token scores "
                            "from the SentencePiece model: copy tokenizer.model from the model's repository (a "
                            "byte-level BPE tokenizer under this architecture, as Phi-4-mini's, is not written yet)")
        _check_sentencepiece(Path(model_dir), tokenizer, config.vocab_size, where)
        return
    try:
        tokenizer_pre(tokenizer)
    except UserError as e:
        raise UserError(f"{where}: {e}. A byte-level BPE tokenizer needs its row in fasttune/convert.py "
                        "PRE_TOKENIZERS (from llama.cpp's convert_hf_to_gguf.py); a SentencePiece one is written "
                        f"only for {', '.join(k for k, a in ARCHITECTURES.items() if a.tokenizer == 'llama')}. "
                        "--quants none trains and merges without a GGUF") from None


def _check_sentencepiece(model_dir: Path, tokenizer, vocab_size: int, where) -> None:
    """The GGUF's vocabulary comes from tokenizer.model, training's from the tokenizer (tokenizer.json): refuse
    the two when they disagree on a piece, or when the model has fewer embedding rows than pieces."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    if sp.vocab_size() > vocab_size:
        raise UserError(f"{where}: tokenizer.model has {sp.vocab_size()} pieces, the model {vocab_size} embedding rows")
    added = tokenizer.added_tokens_decoder
    pieces = tokenizer.convert_ids_to_tokens(list(range(sp.vocab_size())))
    bad = next((i for i in range(sp.vocab_size()) if i not in added and pieces[i] != sp.IdToPiece(i)), None)
    if bad is not None:
        raise UserError(f"{where}: tokenizer.model and the tokenizer disagree on token {bad} ({sp.IdToPiece(bad)!r} "
                        f"against {pieces[bad]!r}); copy both from the same model")


def _permute_qk(weights, n_head: int):
    """HF's rotate-half layout -> llama.cpp's interleaved one, per head (rows of q/k proj)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# Types written directly by this module: name -> (file type, tensor type for 2-D weights).
DIRECT_TYPES = {
    "f32": (FT.ALL_F32, Q.F32),
    "f16": (FT.MOSTLY_F16, Q.F16),
    "bf16": (FT.MOSTLY_BF16, Q.BF16),
    "q8_0": (FT.MOSTLY_Q8_0, Q.Q8_0),
}


# --- vocabulary -------------------------------------------------------------------------------------

def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id, padded to the model's embedding rows.

    GGUF lists one entry per embedding row; ids the tokenizer does not use (Qwen2.5 pads 151,665
    tokens to 151,936 rows) become unused "[PAD<id>]" entries, as llama.cpp expects.
    """
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].special or _looks_special(by_id[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def vocab_sentencepiece(model_dir: Path, tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Token strings, scores and types by id for a SentencePiece checkpoint, as llama.cpp's converter
    makes them: the pieces of tokenizer.model (their scores are SentencePiece's merge priorities), then the
    tokenizer's added tokens over them (score -1000, CONTROL when special), "[PAD<id>]" rows unused."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        tokens[i], scores[i] = sp.IdToPiece(i), sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < vocab_size:
            tokens[i], scores[i] = added.content, -1000.0
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


# --- tensors ----------------------------------------------------------------------------------------

def safetensors_files(model_dir: Path, fix: str = "export needs a merged safetensors checkpoint") -> list[Path]:
    """A checkpoint's weight files: its index's shards, or model.safetensors; else an error ending in `fix`."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{model_dir}: no model.safetensors (or index); {fix}")
    return [single]


def _tensor_type(gguf_name: str, shape: tuple[int, ...], file_qtype: Q) -> Q:
    """Type a tensor is stored in: norms and 1-D tensors F32; rows that do not fit a block F16."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[file_qtype]
    if shape[-1] % block:
        return Q.F16  # llama.cpp's converter falls back the same way
    return file_qtype


def _convert(tensor, qtype: Q) -> np.ndarray:
    """A torch tensor as the bytes GGUF stores for `qtype`.

    bf16 -> BF16 (and f16 -> F16, f32 -> F32) is a copy of the bits: the same bytes llama.cpp's
    converter produces by its float32 round trip (exact for every non-NaN value), without the 2x
    float32 copy in memory and time. Everything else goes through gguf's own quantizers.
    """
    import torch

    same = {Q.BF16: torch.bfloat16, Q.F16: torch.float16, Q.F32: torch.float32}.get(qtype)
    if tensor.dtype == same and not torch.isnan(tensor).any():
        raw = tensor.contiguous().view(torch.int16) if same == torch.bfloat16 else tensor.contiguous()
        return raw.numpy().view(np.uint8) if same == torch.bfloat16 else raw.numpy()
    return gguf.quants.quantize(tensor.float().numpy(), qtype)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as stored, numpy dtype as stored, bytes) for a tensor of `shape` stored as `qtype`."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32), int(np.prod(shape)) * 4
    if qtype == Q.F16:
        return shape, np.dtype(np.float16), int(np.prod(shape)) * 2
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


# --- writing ----------------------------------------------------------------------------------------

def convert(model_dir: str | Path, out_path: str | Path, outtype: str = "bf16", name: str | None = None,
            base_model: str | None = None, recipe: str | None = None, chat_template: str | None = None) -> Path:
    """Write `model_dir` (a merged HF checkpoint) as a GGUF of type `outtype` (f32/f16/bf16/q8_0).
    chat_template: embedded instead of the checkpoint's own (a base model under a run's served template)."""
    from transformers import AutoConfig

    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype not in DIRECT_TYPES:
        raise UserError(f"convert writes {', '.join(DIRECT_TYPES)}; '{outtype}' goes through quantize()")
    config = AutoConfig.from_pretrained(model_dir)
    hf_arch = check_architecture(config, model_dir)
    arch = ARCHITECTURES[hf_arch]
    _check_sliding_window(config, model_dir)
    file_type, file_qtype = DIRECT_TYPES[outtype]
    # llama.cpp gives every special token the whitespace after it, Phi-3's tokenizer rule, in a file whose name
    # holds phi3 or phi-3, whatever its architecture: a file says so exactly when it is a Phi-3
    name = name or model_dir.name
    says_phi3 = re.search(r"phi-?3", name, re.IGNORECASE)
    if arch.phi3 and not says_phi3:
        name += "-phi3"
    elif says_phi3 and not arch.phi3:
        name = re.sub(r"(?i)(phi-?)3", r"\1 3", name)
    tokenizer = cached_tokenizer(model_dir)
    n_layers = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)

    tmp = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    try:
        _add_metadata(writer, config, file_type, name, base_model, recipe, arch)
        _add_tokenizer(writer, model_dir, tokenizer, arch, config.vocab_size, chat_template)

        # Pass 1: names, shapes and types, so the header can be written before any data.
        plan = []  # (load() -> torch tensor as llama.cpp wants it, stored type), in header order
        data_bytes = 0

        def add(gguf_name: str, shape: tuple[int, ...], load) -> None:
            nonlocal data_bytes
            qtype = _tensor_type(gguf_name, shape, file_qtype)
            stored_shape, dtype, nbytes = _nbytes(shape, qtype)
            writer.add_tensor_info(gguf_name, stored_shape, dtype, nbytes, raw_dtype=qtype)
            plan.append((load, qtype))
            data_bytes += _aligned(nbytes)

        for tensor, factors in _rope_factors(config, arch).items():
            add(gguf.TENSOR_NAMES[tensor] + ".weight", tuple(factors.shape), partial(lambda f: f, factors))
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        for st_file in safetensors_files(model_dir):
            with _open_safetensors(st_file) as f:
                for hf_name in f.keys():
                    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied: llama.cpp reuses token_embd
                    gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                    if gguf_name is None:
                        raise UserError(f"{st_file.name}: tensor {hf_name} has no GGUF name for {hf_arch}")
                    proj = hf_name.rsplit(".", 2)[-2]
                    n_head = heads.get(proj) if arch.permute_qk else None
                    add(gguf_name, tuple(f.get_slice(hf_name).get_shape()), partial(_load, st_file, hf_name, n_head))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()  # flushed: the file now holds the whole header
        expected_size = _aligned(tmp.stat().st_size) + data_bytes

        # Pass 2: data, one tensor in memory at a time.
        for load, qtype in tqdm(plan, desc=f"writing {out_path.name}", unit="tensor"):
            try:
                writer.write_tensor_data(_convert(load(), qtype))
            except OSError as e:
                if e.errno is None:  # numpy's tofile reports a short write without errno: the storage is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out_path)) from e
                raise
        writer.close()
        _validate(tmp, len(plan), expected_size)
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(OSError):  # a full disk fails the close too; the partial file goes either way
            writer.close()
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s (%.1f MB)", out_path, out_path.stat().st_size / 1e6)
    return out_path

def _open_safetensors(st_file: Path):
    try:
        return safe_open(st_file, framework="pt")
    except SafetensorError as e:
        raise UserError(f"{st_file} is damaged ({e}); delete {st_file.parent} and run `python export/gguf.py "
                        "RUN_DIR`, which merges the adapter again") from None


def _load(st_file: Path, hf_name: str, permute_heads: int | None):
    with safe_open(st_file, framework="pt") as f:
        tensor = f.get_tensor(hf_name)
    return _permute_qk(tensor, permute_heads) if permute_heads else tensor


def _phi3_rope(config) -> tuple[int, int]:
    """(original context, rotary dims) of a Phi-3 config. The original context sits in the rope parameters
    (longrope) or, without scaling (Phi-3-mini-4k), at the config's top level, where llama.cpp's converter
    also looks; without either there is no scaling to extend anything. (transformers' Phi3Config admits
    longrope alone, with one factor per rotary frequency: nothing else reaches here.)"""
    rope = config.rope_parameters
    original = (rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
                or config.max_position_embeddings)
    return original, int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size) // config.num_attention_heads


def _rope_factors(config, arch: Arch) -> dict:
    """The rope scaling tensors llama.cpp reads: Llama 3.1's frequency factors, Phi-3's long and short ones."""
    if arch.phi3:
        rope = config.rope_parameters
        if rope.get("rope_type") != "longrope":
            return {}
        return {gguf.MODEL_TENSOR.ROPE_FACTORS_LONG: _float32(rope["long_factor"]),
                gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT: _float32(rope["short_factor"])}
    factors = _llama3_rope_factors(config)
    return {} if factors is None else {gguf.MODEL_TENSOR.ROPE_FREQS: factors}


def _float32(values):
    import torch

    return torch.tensor(values, dtype=torch.float32)


def _llama3_rope_factors(config):
    """Llama 3.1's long-context rope scaling as llama.cpp wants it: a per-frequency factor tensor."""
    import torch

    rope = config.rope_parameters or {}
    if rope.get("rope_type") != "llama3":
        return None
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    out = []
    for freq in freqs:  # 0-d float32 tensors: the same arithmetic, so the same bits, as llama.cpp's converter
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor([float(x) for x in out], dtype=torch.float32)


def _check_sliding_window(config, model_dir: Path) -> None:
    """llama.cpp's qwen2, llama and phi3 graphs attend to the whole context: a checkpoint that really uses a
    sliding window would answer differently past the window, so it is refused rather than written.
    (Every Qwen2.5 config carries `sliding_window` with `use_sliding_window: false`, and Phi-3.5-mini's
    window, 262,144, is wider than its context: nothing to write, as llama.cpp's converter does.)"""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window and window < config.max_position_embeddings:
        # Qwen2 switches the window by use_sliding_window; Phi-3 has no such key and applies any window it is given
        off = ("use_sliding_window to false" if hasattr(config, "use_sliding_window") else "sliding_window to null")
        raise UserError(f"{model_dir}: a sliding window of {window} tokens is in use; llama.cpp runs this "
                        "architecture with full attention, so the GGUF would differ past the window. Set "
                        f"{off} in config.json if the model was trained without it")


def _add_metadata(writer: gguf.GGUFWriter, config, file_type: FT, name: str, base_model: str | None,
                  recipe: str | None, arch: Arch) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if recipe:  # which fasttune recipe produced the weights (general.finetune)
        writer.add_finetune(recipe)
    if base_model:  # what it was fine-tuned from, as llama.cpp's converter records it
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = config.rope_parameters  # transformers 5 keeps rope here
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads  # not every config has it
    if arch.phi3:
        original, dims = _phi3_rope(config)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(dims)
        writer.add_sliding_window(config.sliding_window or 0)  # 0 tells llama.cpp a Phi-4 from a Phi-3
        scale = config.max_position_embeddings / original
        if rope.get("rope_type") == "longrope":  # attention scaled as transformers' does: sqrt(1 + ln s / ln orig)
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.write_vocab_and_rope_dims:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, tokenizer, arch: Arch, vocab_size: int,
                   chat_template: str | None = None) -> None:
    writer.add_tokenizer_model(arch.tokenizer)
    if arch.tokenizer == "llama":  # SentencePiece
        tokens, scores, types = vocab_sentencepiece(model_dir, tokenizer, vocab_size)
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
    else:  # byte-level BPE
        tokens, types = vocab(tokenizer, vocab_size)
        writer.add_tokenizer_pre(tokenizer_pre(tokenizer))
        writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges (BPE), bos/eos/pad ids and the chat template, read from the tokenizer files
    special = gguf.SpecialVocab(model_dir, load_merges=arch.tokenizer == "gpt2", n_vocab=vocab_size)
    # Whether llama.cpp adds BOS/EOS when tokenizing: what the tokenizer's post-processor says (as llama.cpp's
    # converter reads it), else measured from what the tokenizer does.
    if not special.add_special_token:
        probe = tokenizer.encode("a", add_special_tokens=True)
        special.add_special_token = {
            "bos": tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id,
            "eos": probe[-1] == tokenizer.eos_token_id,
        }
    if chat_template:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        writer.add_eot_token_id(im_end)  # end of turn = end of generation, also for base checkpoints


def _aligned(n: int) -> int:
    return gguf.GGUFWriter.ggml_pad(n, gguf.GGUF_DEFAULT_ALIGNMENT)


def _validate(path: Path, n_tensors: int, expected_size: int) -> None:
    """The written file is a complete GGUF: magic, version, tensor count and every data byte.

    (Parsing it with GGUFReader would also work but costs ~15 s for Qwen's 151,936-token vocab.)
    """
    with open(path, "rb") as f:
        magic, version, count = struct.unpack("<IIQ", f.read(16))
    size = path.stat().st_size
    if (magic, version, count, size) != (gguf.GGUF_MAGIC, gguf.GGUF_VERSION, n_tensors, expected_size):
        raise RuntimeError(f"{path}: incomplete GGUF (magic {magic:#x}, version {version}, {count} tensors, "
                           f"{size} bytes; expected {n_tensors} tensors, {expected_size} bytes)")
