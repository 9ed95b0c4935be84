"""Predict a training run's peak memory before loading any weight, and whether it fits a GPU.

    python recipes/<task>.py --model Qwen/Qwen2.5-7B-Instruct --plan [--gpu_gb 12]

The parameter counts come from the model's own config built on the meta device (no weights read);
the rest is arithmetic over batch x seq tokens. Parts, in bytes:
  weights      4-bit: nf4 linears (4 bits + double-quantized absmax) + 16-bit embeddings/norms/biases;
               16-bit: every parameter in bf16
  LoRA + optim the adapters, their gradients and the optimizer's two moments
  activations  what backward needs: with gradient checkpointing each layer's input plus one layer
               recomputed at a time; without it every layer's saved tensors
  logits       the LM head's (tokens x vocab) block, which both loss paths compute in row chunks
Which kernels run differs by device, so does the arithmetic (each constant says where it is from):
on a GPU Unsloth offloads the checkpointed layer inputs to host RAM and sizes its cross-entropy
chunks from the free memory; on a CPU the layer inputs stay and the chunk is fixed (~64 MB fp32).
Checked against measurement on CPU (tests/test_plan.py, bench/train.py); GPU figures are the same
formulas with the GPU's loss and offload rules and are checked whenever a GPU is at hand.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fasttune import UserError
from fasttune.config import ModelConfig, TrainConfig, lora_targets

GPU_SIZES_GB = (8, 12, 16, 24)
MIB = 2**20
GIB = 2**30

# bitsandbytes nf4 with double quantization (Unsloth's setting): 4 bits per weight, an 8-bit absmax
# per 64 weights and an fp32 scale per 256 absmax blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# Optimizer state bytes per trainable parameter: AdamW's two moments. bitsandbytes' 32-bit and paged
# optimizers keep them in fp32; torch's AdamW in the parameter's dtype; 8-bit ones in one byte each.
ADAM_STATE_BYTES = {"32bit": 8, "8bit": 2}
# Unsloth's GPU cross-entropy: 16 bytes per (token x vocab) element over the chunk's eager chain
# (bf16 logits, fp32 upcast, saved log-softmax, gradient; unsloth_zoo fused_losses), chunks sized to
# at most half the free memory and never over 4 GiB.
GPU_CE_BYTES_PER_LOGIT = 16
GPU_CE_CAP = 4 * GIB
# Unsloth's CPU cross-entropy (unsloth_zoo.cpu.ops): row chunks of 2**24 / vocab rows, each an fp32
# block and the bf16 matmul result it came from; with several chunks the previous fp32 block is still
# referenced while the next one is made: 10 bytes per element at the peak.
CPU_CE_CHUNK_ELEMENTS = 2**24
CPU_CE_BYTES_PER_LOGIT = 10
# Per token and layer, elements a Qwen2/Llama block keeps for backward, in multiples of the hidden
# (h), key/value (kv) and MLP (f) widths: norms (fp32 inside RMSNorm), q/k/v and their rotated
# copies, attention output, o_proj, the MLP's gate, up, activation and product (counted from the
# modeling code, not fitted).
LAYER_H, LAYER_KV, LAYER_F = 14, 3, 4
# Memory that is not a tensor of the model. GPU: the CUDA context and cuBLAS workspaces, outside
# torch's allocator (an estimate: ~0.5 GiB on current cards). CPU: the Qwen2 tokenizer (151k entries,
# ~40 MB) and ~25 MB the trainer holds whatever the model (measured here on the tiny and 0.5B shapes).
OVERHEAD = {"cuda": 0.5 * GIB, "cpu": 65 * MIB}


@dataclass
class Shapes:
    """What the planner needs from a model config, counted on the meta device."""

    linear: int  # parameters in the decoder's linear layers (quantized in 4-bit)
    other: int  # every other parameter: embeddings, untied LM head, norms, biases
    lora_per_rank: int  # sum of (in + out) over the LoRA-targeted linears: LoRA params = r x this
    lora_inputs: int  # sum of in_features of the LoRA-targeted linears in one layer (dropout copies)
    hidden: int
    kv: int  # key/value width: kv heads x head dim
    ffn: int
    layers: int
    vocab: int


def shapes(model: str, target_modules: list[str]) -> Shapes:
    from transformers import AutoConfig, AutoModelForCausalLM

    from fasttune.base_model import resolve

    try:
        config = AutoConfig.from_pretrained(resolve(model))
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model}: cannot read its config.json ({str(e).splitlines()[0]}); pass a local model "
                        "directory, or a hub name with the network (or the hub cache) at hand") from None
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    head = meta.get_output_embeddings()
    linears = {name: m for name, m in meta.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    linear = sum(m.weight.numel() for m in linears.values())
    total = sum(p.numel() for p in meta.parameters())
    targets = lora_targets(target_modules, {name.rsplit(".", 1)[-1] for name in linears})
    targeted = [m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets]
    lora = sum(m.in_features + m.out_features for m in targeted)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Shapes(linear=linear, other=total - linear, lora_per_rank=lora,
                  lora_inputs=sum(m.in_features for m in targeted) // config.num_hidden_layers, hidden=config.hidden_size,
                  kv=config.num_key_value_heads * head_dim, ffn=config.intermediate_size,
                  layers=config.num_hidden_layers, vocab=config.vocab_size)


@dataclass
class Plan:
    device: str  # "cuda" or "cpu"
    tokens: int  # batch x seq
    weights: int  # bytes, as every part below
    lora: int  # adapters + gradients + optimizer moments
    layer_inputs: int  # activations alive through the whole step
    layer_backward: int  # one layer recomputed and differentiated (gradient checkpointing)
    full_logits: int  # the loss's block: all tokens at once (GPU, before chunking) or one chunk (CPU)
    overhead: int

    def logits(self, gpu_bytes: int | None = None) -> int:
        """The loss's block: on a GPU Unsloth chunks it to half of what is free, at most 4 GiB."""
        if self.device == "cpu" or gpu_bytes is None:
            return self.full_logits
        free = gpu_bytes - self.overhead - self.weights - self.lora - self.layer_inputs
        return max(0, min(self.full_logits, GPU_CE_CAP, free // 2))

    def total(self, gpu_bytes: int | None = None) -> int:
        """Predicted peak. The loss runs, and frees its block, before backward recomputes the layers:
        the peak holds the larger of the two, not both."""
        return (self.weights + self.lora + self.layer_inputs + max(self.layer_backward, self.logits(gpu_bytes))
                + self.overhead)

    def needs(self) -> int:
        """The least memory the run can train in: on a GPU the loss chunks shrink to what is free, down
        to (we take) a tenth of the unchunked block or 4 GiB; the rest does not shrink."""
        if self.device == "cpu":
            return self.total()
        least_logits = min(self.full_logits, GPU_CE_CAP) // 10
        return self.weights + self.lora + self.layer_inputs + max(self.layer_backward, least_logits) + self.overhead

    def fits(self, gpu_bytes: int) -> bool:
        return self.needs() <= gpu_bytes

    def rows(self, gpu_bytes: int | None = None) -> list[tuple[str, int]]:
        return [("weights", self.weights), ("LoRA + optimizer", self.lora), ("activations: layer inputs", self.layer_inputs),
                ("activations: backward", self.layer_backward), ("logits (loss)", self.logits(gpu_bytes)),
                ("CUDA context" if self.device == "cuda" else "tokenizer, runtime", self.overhead)]


# After training, host RAM (bench/merge.py measures the merge and the export against PEFT's merge):
RUNTIME_RAM = 256 * MIB  # torch + transformers + safetensors imported (a fresh process's high-water mark)
MERGE_SHARD = 512 * MIB  # fasttune.merge.SHARD_BYTES


def after_training(s: Shapes, lora_r: int, device: str) -> list[tuple[str, int]]:
    """(step, peak host RAM in bytes) of what runs after training. The merge and the export stream
    tensor by tensor, so they grow with the largest tensor, not the model; the importance matrix and
    the HF-side evaluation hold the whole merged model (bf16, or float32 on a CPU)."""
    params = s.linear + s.other
    largest = 2 * max(s.vocab * s.hidden, s.ffn * s.hidden)  # bf16: the embedding, or an MLP matrix
    # an output shard and safetensors' serialized copy of it; one MLP matrix and its delta in float32; the adapter
    merge = (RUNTIME_RAM + 2 * max(min(MERGE_SHARD, 2 * params), largest) + 2 * 4 * s.ffn * s.hidden
             + 4 * lora_r * s.lora_per_rank)
    export = RUNTIME_RAM + 2 * largest + 256 * MIB  # one tensor and its converted copy; the writer, the tokenizer
    on_gpu = device == "cuda"  # loaded in bf16 on the host, then moved to the GPU
    return [("merge (streamed)", merge), ("GGUF export (streamed)", export),
            ("importance matrix (bf16)", RUNTIME_RAM + 2 * params),
            ("evaluation, fidelity reference", RUNTIME_RAM + (2 if on_gpu else 4) * params)]


def plan(model: ModelConfig, train: TrainConfig, device: str | None = None, sizes: Shapes | None = None) -> Plan:
    """Predicted peak memory of training `model` with `train`'s batch on `device` (default: this machine's)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = sizes or shapes(model.model, model.lora_target_modules)
    tokens = train.batch_size * model.max_seq_length

    weights = (s.linear * NF4_BYTES_PER_WEIGHT + s.other * 2) if model.load_in_4bit else (s.linear + s.other) * 2
    # TRL keeps QLoRA adapters in bf16 (the QLoRA paper's setting); 16-bit LoRA trains fp32 adapters.
    param_bytes = 2 if model.load_in_4bit else 4
    optim = train.optim if device == "cuda" else "adamw_torch"  # CPU: fasttune swaps bnb optimizers out
    state = next((v for k, v in ADAM_STATE_BYTES.items() if k in optim), 2 * param_bytes)
    lora = model.lora_r * s.lora_per_rank * (2 * param_bytes + state)

    layer = (LAYER_H * s.hidden + LAYER_KV * s.kv + LAYER_F * s.ffn) * 2  # bf16, per token
    if model.lora_dropout > 0:
        # a one-byte mask per adapted input; PEFT (the CPU backend) also keeps the dropped bf16 copy,
        # while Unsloth's fused kernels (a GPU) replay the mask on X in the backward pass
        layer += (1 if device == "cuda" else 3) * s.lora_inputs
    if model.gradient_checkpointing:
        # Each layer's input is kept; on a GPU Unsloth offloads them to host RAM (two in flight).
        layer_inputs = tokens * s.hidden * 2 * (2 if device == "cuda" else s.layers)
    else:
        layer_inputs = tokens * layer * s.layers
    if device == "cuda":
        full_logits = GPU_CE_BYTES_PER_LOGIT * tokens * s.vocab
    else:
        rows = min(tokens, max(16, CPU_CE_CHUNK_ELEMENTS // s.vocab))
        full_logits = CPU_CE_BYTES_PER_LOGIT * rows * s.vocab
    return Plan(device, tokens, int(weights), int(lora), int(layer_inputs), int(tokens * layer), int(full_logits),
                int(OVERHEAD[device]))


def report(p: Plan, model: ModelConfig, train: TrainConfig, gpu_gb: float | None = None) -> str:
    """The GPU plan as a person reads it: one column per GPU size (the loss chunk depends on it)."""
    sizes = [gpu_gb] if gpu_gb else list(GPU_SIZES_GB)
    lines = [f"memory plan: {model.model}, {'4-bit' if model.load_in_4bit else '16-bit'} base, LoRA r {model.lora_r}, "
             f"batch {train.batch_size} x {model.max_seq_length} tokens, gradient checkpointing "
             f"{'on' if model.gradient_checkpointing else 'off'}",
             f"  {'GB':<27}" + "".join(f"{f'{g:g} GB GPU':>12}" for g in sizes)]
    columns = [p.rows(g * GIB) for g in sizes]
    for i, (name, _) in enumerate(columns[0]):
        lines.append(f"  {name:<27}" + "".join(f"{col[i][1] / GIB:12.2f}" for col in columns))
    lines.append(f"  {'peak':<27}" + "".join(f"{p.total(g * GIB) / GIB:12.2f}" for g in sizes))
    lines.append(f"  {'fits (needs ' + f'{p.needs() / GIB:.2f} GB)':<27}"
                 + "".join(f"{'yes' if p.fits(g * GIB) else 'NO':>12}" for g in sizes))
    lines.append(f"  The loss over all {p.tokens} tokens at once would take {p.full_logits / GIB:.2f} GB; Unsloth splits it "
                 "into chunks that fit half of the free memory (at most 4 GB), so the peak grows with the GPU while "
                 "the need does not. The loss block and the backward layer are never alive together: the peak "
                 "counts the larger.")
    return "\n".join(lines)


def remedies(model: ModelConfig, train: TrainConfig, sizes: Shapes) -> list[tuple[str, int]]:
    """(flags, GPU memory the run then needs) for each change that lowers it; each keeps the effective
    batch or the model and costs something else (time, context, capacity)."""
    changes = []
    if train.batch_size > 1:
        changes.append((f"--batch_size {train.batch_size // 2} --grad_accum {train.grad_accum * 2} (same effective "
                        "batch, slower)", model, replace(train, batch_size=train.batch_size // 2)))
    seq = max(model.max_seq_length // 2, 128)
    changes.append((f"--max_seq_length {seq} (longer answers are left out and counted)",
                    replace(model, max_seq_length=seq), train))
    if not model.gradient_checkpointing:
        changes.append(("--gradient_checkpointing true (about 20-30 % slower)",
                        replace(model, gradient_checkpointing=True), train))
    if not model.load_in_4bit:
        changes.append(("--load_in_4bit true (QLoRA: base weights in 4 bits)", replace(model, load_in_4bit=True), train))
    if model.lora_r > 8:
        changes.append((f"--lora_r {model.lora_r // 2}", replace(model, lora_r=model.lora_r // 2), train))
    return [(flags, plan(m, t, "cuda", sizes).needs()) for flags, m, t in changes]


def describe(model: ModelConfig, train: TrainConfig, gpu_gb: float | None = None) -> str:
    """--plan's answer: the GPU plan, what to lower where it does not fit, and on a machine without a
    GPU the plan for this CPU as well."""
    sizes = shapes(model.model, model.lora_target_modules)
    gpu_plan = plan(model, train, "cuda", sizes)
    text = report(gpu_plan, model, train, gpu_gb)
    too_small = [g for g in ([gpu_gb] if gpu_gb else GPU_SIZES_GB) if not gpu_plan.fits(g * GIB)]
    if too_small:
        g = max(too_small)
        text += f"\n  to fit {g:g} GB, lower one of:" + "".join(
            f"\n    {flags}: needs {need / GIB:.2f} GB" for flags, need in remedies(model, train, sizes))
    if not torch.cuda.is_available():
        text += f"\n  on this CPU (no GPU here): peak {plan(model, train, 'cpu', sizes).total() / GIB:.2f} GB of RAM"
    gpu, cpu = (after_training(sizes, model.lora_r, d) for d in ("cuda", "cpu"))
    text += f"\n  after training: host RAM (GB) {'with a GPU':>12}{'CPU alone':>12}"
    for (step, on_gpu), (_, on_cpu) in zip(gpu, cpu):
        text += f"\n    {step:<30}{on_gpu / GIB:12.2f}{on_cpu / GIB:12.2f}"
    text += ("\n  With a GPU the whole models go to it in bf16 after loading; on a CPU the evaluation runs in float32. "
             "The merge and the export hold one tensor at a time.")
    return text
