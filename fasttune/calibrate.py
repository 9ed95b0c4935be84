"""Importance matrix: how much each input channel of each linear layer matters, on the user's data.

llama.cpp's quantizers can weight every column's rounding error by the mean squared activation that
reaches it (what its `llama-imatrix` tool measures by running the model). We measure the same thing
in-process: forward pre-hooks on the merged 16-bit model's linear layers, run over the run's own
training conversations, add up x**2 per input channel. Streaming: one running sum per layer
(in_features floats), no activation is kept. Written by hand because no Python library computes
llama.cpp's importance matrix; the file it writes is llama.cpp's own imatrix GGUF format, so
`llama-quantize --imatrix` reads it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from fasttune import cached_tokenizer, free_accelerator_memory

logger = logging.getLogger(__name__)

# On real weights a matrix of 8,192 tokens calibrates q4_k_m, iq4_xs, q3_k_m and q2_k to within 2.4 %
# of the KL a 32,768-token one gives, where the matrix itself is worth 1.7x (bench/imatrix_tokens.py):
# a fourth of the tokens, about half a minute for a 0.5B model on a 2-core CPU.
MAX_TOKENS = 8_192
MAX_LENGTH = 1024  # tokens per conversation
# Conversations per forward pass, right-padded, up to this many tokens with the padding: one short
# conversation at a time leaves a CPU's matmuls small; activations stay those of one MAX_LENGTH one.
BATCH_TOKENS = 1024


@dataclass
class ImportanceMatrix:
    sums: dict[str, np.ndarray]  # GGUF tensor name -> sum over tokens of x**2, per input channel
    tokens: int  # tokens the sums are over
    source: str  # what text it was computed on

    def values(self) -> dict[str, np.ndarray]:
        """Mean squared activation per input channel: what llama_model_quantize takes."""
        return {name: (s / self.tokens).astype(np.float32) for name, s in self.sums.items()}

    def save(self, path: Path) -> Path:
        """llama.cpp's imatrix GGUF: <tensor>.in_sum2 (sums) and <tensor>.counts, datasets, chunks."""
        tmp = path.with_name(path.name + ".partial")
        writer = gguf.GGUFWriter(tmp, arch="imatrix")  # general.architecture is ignored by readers
        writer.add_type("imatrix")
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [self.source])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 1)
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, self.tokens)
        for name, s in self.sums.items():
            writer.add_tensor(f"{name}.in_sum2", s.astype(np.float32).reshape(1, -1))
            writer.add_tensor(f"{name}.counts", np.array([[self.tokens]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> ImportanceMatrix:
        reader = gguf.GGUFReader(path)
        tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
        sums = {name.removesuffix(".in_sum2"): data.reshape(-1) for name, data in tensors.items()
                if name.endswith(".in_sum2")}
        tokens = int(next(iter(tensors[f"{name}.counts"] for name in sums)).reshape(-1)[0])
        field = reader.fields[gguf.Keys.IMatrix.DATASETS]
        source = bytes(field.parts[field.data[0]]).decode()
        return cls(sums, tokens, source)


def compute(merged_dir: Path, conversations: list[list[dict]], source: str) -> ImportanceMatrix:
    """Run the merged model over the conversations (chat template applied, up to MAX_TOKENS tokens in
    all) and collect each linear layer's squared inputs under its GGUF tensor name."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fasttune.convert import ARCHITECTURES

    config = AutoConfig.from_pretrained(merged_dir)
    names = gguf.get_tensor_name_map(ARCHITECTURES[config.architectures[0]].gguf_arch, config.num_hidden_layers)
    tokenizer = cached_tokenizer(merged_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).to(device).eval()

    sums: dict[str, torch.Tensor] = {}
    real = {}  # "rows": which rows of the flattened batch are tokens, not padding

    def add(gguf_name, x):
        x = x.detach().reshape(-1, x.shape[-1])[real["rows"]].float()
        sums[gguf_name] = sums.get(gguf_name, 0) + (x * x).sum(0)  # (in_features,)

    # The output layer is never run: its input is the decoder's last hidden state, and its vocabulary-
    # wide logits would be a quarter of a 0.5B's compute. A tied head is the token embedding in GGUF,
    # which llama.cpp quantizes without a matrix.
    head, decoder = model.get_output_embeddings(), model.get_decoder()
    head_name = None
    handles = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
        if module is head:
            head_name = None if config.tie_word_embeddings else gguf_name
        elif gguf_name is not None:
            handles.append(module.register_forward_pre_hook(lambda m, inputs, name=gguf_name: add(name, inputs[0])))

    tokens = 0
    try:
        groups = list(_batches(tokenizer, conversations))
        with torch.no_grad(), tqdm(total=sum(len(ids) for g in groups for ids in g), desc="importance matrix",
                                   unit="tok") as bar:
            for group in groups:
                width = max(map(len, group))
                # right padding: causal attention keeps every real token's activations as they are alone
                mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in group], device=device)
                padded = torch.tensor([ids + [0] * (width - len(ids)) for ids in group], device=device)
                real["rows"] = mask.reshape(-1).bool()
                hidden = decoder(input_ids=padded, attention_mask=mask, use_cache=False).last_hidden_state
                if head_name:
                    add(head_name, hidden)
                tokens += sum(map(len, group))
                bar.update(sum(map(len, group)))
    finally:
        for h in handles:
            h.remove()
        del model
        free_accelerator_memory()
    logger.info("importance matrix over %d tokens of %s (%d tensors)", tokens, source, len(sums))
    return ImportanceMatrix({name: s.double().cpu().numpy() for name, s in sums.items()}, tokens, source)


def _batches(tokenizer, conversations: list[list[dict]]):
    """The conversations' token ids (each cut at MAX_LENGTH, MAX_TOKENS in all), in order, grouped so
    that each group padded to its longest member holds at most BATCH_TOKENS."""
    group, total = [], 0
    for conv in conversations:
        ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)[:MAX_LENGTH][: MAX_TOKENS - total]
        if not ids:
            break
        if group and (len(group) + 1) * max(len(ids), *map(len, group)) > BATCH_TOKENS:
            yield group
            group = []
        group.append(ids)
        total += len(ids)
    if group:
        yield group


def for_run(run_dir: Path) -> ImportanceMatrix:
    """The run's importance matrix: gguf/imatrix.gguf when it is newer than the merged model, else
    computed on the run's training conversations (data/train.jsonl) and saved there."""
    from fasttune import rundir

    run_dir = Path(run_dir)
    path, merged = run_dir / "gguf" / "imatrix.gguf", run_dir / "merged"
    weights = max(p.stat().st_mtime for p in merged.glob("*.safetensors"))
    if path.is_file() and path.stat().st_mtime > weights:
        return ImportanceMatrix.load(path)
    examples = rundir.in_seeded_order(run_dir, "train")  # compute reads at most MAX_TOKENS of them
    matrix = compute(merged, [ex.messages for ex in examples], source=f"{run_dir.name}/data/train.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    matrix.save(path)
    rundir.add_file(run_dir, path, "imatrix")
    return matrix
