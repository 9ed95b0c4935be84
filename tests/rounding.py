"""How far llama.cpp's arithmetic may move a logit gap of the HF model: the bound that tells a
legitimately flipped near-tie from a wrong export.

The exported file holds the very weight bits of the merged checkpoint (saved in bf16; a bf16 GGUF
copies them, an f32 one widens them exactly). What differs is the arithmetic. For a matmul
y = W x llama.cpp
  - rounds the input x to the weight's type before the dot products when that type is bf16
    (round to nearest: relative error at most u = 2^-8, bf16 having 8 significant bits); x is rounded
    once however many matmuls read it (q, k and v read one input);
  - accumulates each length-n dot product in f32 in its own order; so does torch, in another one.
    Each result is within gamma_n * sum_i |W_ji| |x_i| of the exact one, gamma_n = n u32 / (1 - n u32),
    u32 = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5).
Attention is no nn.Linear; its errors are put on what enters it: q and k by the q.k dot products over
a head (gamma_head_dim) and RoPE's angle (position x u32 absolute, x2 for the two sides), v by the
softmax-weighted sums over the positions (gamma_positions). Elementwise f32 work (RMS norm, SiLU,
softmax, residual adds) is a relative EPS_F32 on every matmul input.
The KV cache is kept in f32 for these comparisons (`F32_CACHE`): llama.cpp's default f16 cache is a
runtime choice, not part of the export, and would round K and V a second time.

To first order, with signs taken worst-case, a gap d = logit_a - logit_b at one position then moves
by at most
    sum over matmul inputs x, at every position:   (u + EPS_F32) * sum_i |dd/dx_i * x_i|
  + sum over matmul outputs y = W x:                2 gamma_n * sum_j |dd/dy_j| * (|W| |x|)_j
  + attention, on the q/k/v outputs y:              e * sum_j |dd/dy_j * y_j|
(the factor 2: both sides round their sums). The gradients come from autograd on the float32 HF model.
This is a first-order model, not a proof: second-order terms are u^2 smaller. Real shifts are far
below it (errors of random sign cancel); a wrong export (a transposed, missing or mis-scaled tensor)
moves gaps by whole logits and fails it.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import torch
from transformers import GenerationConfig

from fasttune import infer

UNIT_ROUNDOFF = {"f32": 0.0, "bf16": 2.0**-8}
U32 = 2.0**-24
EPS_F32 = 16 * U32  # a few f32 ulps per elementwise op before each matmul (ggml's expf is within 2 ulps)
F32_CACHE = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}


def gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def gap_bound(model, ids: list[int], pos: int, a: int, b: int | None, outtype: str) -> float:
    """First-order worst-case |change| of logits[pos, a] - logits[pos, b] (of logits[pos, a] alone when
    b is None; the model fed ids[:pos + 1]) when llama.cpp evaluates a GGUF of type `outtype` ("f32" or
    "bf16") written from this model."""
    assert model.dtype == torch.float32, "the bound's gradients are those of the float32 model"
    u = UNIT_ROUNDOFF[outtype]
    seen = []  # (name, linear, its input, its output), in forward order

    def keep(name):
        return lambda module, inputs, output: seen.append((name, module, inputs[0], output))

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if outtype == "bf16":  # the file holds these bits: nothing is rounded but the arithmetic
        assert all(torch.equal(m.weight, m.weight.bfloat16().float()) for _, m in linears)
    hooks = [m.register_forward_hook(keep(n)) for n, m in linears]
    try:
        # inputs_embeds that need a gradient: the whole forward is then on the autograd graph
        embeds = model.get_input_embeddings()(torch.tensor([ids[: pos + 1]])).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1]  # the head on position pos only
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(linears), "a forward that bypasses the nn.Linear modules would shrink the bound"
    gap = logits[a] - (logits[b] if b is not None else 0)
    grads = torch.autograd.grad(gap, [x for _, _, x, _ in seen] + [y for _, _, _, y in seen])
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    qk, v = gamma(head_dim) + 2 * (pos + 1) * U32, gamma(pos + 1)
    attention = {"q_proj": qk, "k_proj": qk, "v_proj": v, "qkv_proj": max(qk, v)}  # Phi-3 computes all three in one
    bound, rounded = 0.0, set()
    with torch.no_grad():
        for (name, linear, x, y), gx, gy in zip(seen, grads[: len(seen)], grads[len(seen):]):
            if id(x) not in rounded:  # gx is already the total over every matmul that reads x
                rounded.add(id(x))
                bound += (u + EPS_F32) * (gx * x).abs().sum().item()
            gy2 = gy.flatten(0, -2).abs()
            rows, cols = gy2.sum(-1) > 0, gy2.sum(0) > 0  # positions and outputs that reach the gap
            accumulated = x.flatten(0, -2)[rows].abs() @ linear.weight[cols].abs().T
            bound += 2 * gamma(x.shape[-1]) * (gy2[rows][:, cols] * accumulated).sum().item()
            bound += attention.get(name.rsplit(".", 1)[-1], 0.0) * (gy * y).abs().sum().item()
    return bound


def greedy_disagreements(path, model, prompts: list[list[int]], outtype: str, max_new_tokens: int = 24,
                         eos: int | None = None):
    """Where the GGUF at `path` picks another token than the float32 HF `model` by more than rounding allows.

    For each prompt: the HF greedy continuation; then (1) teacher-forced, at every step the file's
    top-1 token given HF's own prefix; (2) free-running, the file's own greedy continuation up to its
    first divergence. Wherever the two pick different tokens a and b, HF's gap logit_a - logit_b must be
    within gap_bound; each time it is not is one line it yields (none: the file agrees).
    """
    with infer.load(path, n_ctx=512, logits_all=True, **F32_CACHE) as llm:
        for prompt in prompts:
            with torch.no_grad():  # plain argmax, as llama.cpp's greedy (not the model's generation_config)
                plain = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                         pad_token_id=eos)
                out = model.generate(torch.tensor([prompt]), generation_config=plain)[0].tolist()
                hf_logits = model(torch.tensor([out])).logits[0].numpy()
            steps = range(len(prompt) - 1, len(out) - 1)  # position p predicts token p + 1
            llm.reset()
            llm.eval(out)
            file_top1 = np.array(llm.scores[: len(out)]).argmax(-1)
            flips = [(p, out[p + 1], int(file_top1[p])) for p in steps if file_top1[p] != out[p + 1]]
            free = []
            for tok in llm.generate(prompt, temp=0.0, reset=True):
                free.append(tok)
                if tok == eos or len(free) == len(out) - len(prompt):
                    break
            first = next((k for k, (f, h) in enumerate(zip(free, out[len(prompt):])) if f != h), None)
            if first is not None:
                flips.append((len(prompt) - 1 + first, out[len(prompt) + first], free[first]))
            for p, want, got in sorted(set(flips)):  # teacher-forced and free-running may flag one step twice
                gap = float(hf_logits[p, want] - hf_logits[p, got])
                bound = gap_bound(model, out, p, want, got, outtype)
                if gap > bound:
                    yield (f"prompt of {len(prompt)} tokens, step {p - len(prompt) + 2}: file picks {got}, HF {want} "
                           f"by a gap of {gap:.4f} > {bound:.4f} that rounding can move")
