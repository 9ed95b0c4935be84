"""Mixed precision by where the fine-tune moved: the tensors whose LoRA delta matters most keep a higher type.

A LoRA delta is small next to a 4-bit grid step, so quantizing base + delta to q4_k_m can round much
of the fine-tune away while the base survives. llama.cpp's own mixes pick tensors by name (attn_v
and half of ffn_down get q6_k in q4_k_m), knowing nothing of the fine-tune. Here each tensor the
adapter changed is ranked by how much the delta changes that layer's output, per weight:

    energy = sum_j imp_j * ||dW[:, j]||^2 / (out * in),   dW = scale * B @ A  (out x in)

imp_j: the mean squared input of channel j on the run's training texts (fasttune.calibrate; 1
without a matrix). The tensors with the most, up to a share of the adapted weights, get the higher
type. A mix file is the plain base-type file with those tensors' bytes taken from the higher-type
file (fasttune.gguf_file.write_swapped), without quantizing the model again. When the 16-bit file
holds the merged weights exactly (bf16 weights in a bf16 file, the default), that is byte for byte
what llama.cpp's quantizer writes with per-tensor overrides to the higher type and every other
tensor pinned to its type in the plain file (tests/test_mix.py); otherwise the promoted tensors are
rounded once, from the merged weights, where llama.cpp would round them twice. Pinned, because
llama.cpp counts layers as it assigns its own mix (attn_v and ffn_down of some layers get more bits)
and an override skips that count, which moves its protection to other layers (measured on SmolLM2:
q4_k_m's KL 0.0044, the unpinned mix 0.0146).
Written by hand: no library ranks tensors by a fine-tune's delta.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fasttune import UserError

logger = logging.getLogger(__name__)

# type name -> (base type, the higher type, share of the adapted weights at the higher type). Two
# budgets: q8_0 costs 8.5 bits per weight against q4_k_m's ~4.9, so a quarter adds about 0.9 bit.
MIXES = {
    "q4_k_m-mix10": ("q4_k_m", "q8_0", 0.10),
    "q4_k_m-mix25": ("q4_k_m", "q8_0", 0.25),
}


def delta_energy(adapter_dir: Path, base_dir: Path, imatrix: dict[str, np.ndarray] | None) -> dict[str, tuple[float, int]]:
    """GGUF tensor name -> (importance-weighted energy of the delta per weight, weights) for every tensor
    the adapter changed."""
    import torch
    from transformers import AutoConfig

    from fasttune.lora_gguf import gguf_names, read_adapter

    pairs, scale = read_adapter(adapter_dir)
    names = gguf_names(AutoConfig.from_pretrained(base_dir))
    gguf_name = {hf_name: names.get_name(hf_name, try_suffixes=(".weight",)) for hf_name in pairs}
    for hf_name, name in gguf_name.items():
        if name is None:
            raise UserError(f"{adapter_dir}: the adapter changes {hf_name}, which has no GGUF tensor name")
    # channel importance for all the tensors or for none: ones beside measured values would rank on two scales
    weighted = bool(imatrix) and all(name in imatrix for name in gguf_name.values())
    out = {}
    with torch.no_grad():
        for hf_name, ab in pairs.items():
            name = gguf_name[hf_name]
            a, b = ab["a"].double(), ab["b"].double()  # (r, in), (out, r)
            # ||dW[:, j]||^2 = scale^2 * A[:, j]^T (B^T B) A[:, j]: no out x in matrix is formed
            column = scale**2 * torch.einsum("rj,rs,sj->j", a, b.T @ b, a)
            imp = torch.from_numpy(imatrix[name]).double() if weighted else torch.ones_like(column)
            weights = b.shape[0] * a.shape[1]
            out[name] = (float((imp * column).sum()) / weights, weights)
    return out


def promoted(energy: dict[str, tuple[float, int]], share: float) -> list[str]:
    """The tensors with the most energy per weight, together at most `share` of the weights (a tensor
    that does not fit is passed over for smaller ones that do)."""
    budget, taken, out = share * sum(n for _, n in energy.values()), 0, []
    for name, (_, n) in sorted(energy.items(), key=lambda kv: (-kv[1][0], kv[0])):
        if taken + n <= budget:
            out.append(name)
            taken += n
    return out


def write(name: str, energy: dict[str, tuple[float, int]], plain: dict[str, Path], path: Path) -> Path:
    """One of MIXES at `path`, from plain: quant type -> the run's file in it (the mix's base type and
    its higher type)."""
    from fasttune import gguf_file

    base, higher, share = MIXES[name]
    chosen = promoted(energy, share)
    logger.info("%s: %d of %d adapted tensors at %s", name, len(chosen), len(energy), higher)
    return gguf_file.write_swapped(plain[base], plain[higher], set(chosen), path)


def describe() -> str:
    """What the mix candidates are, in a sentence for gguf/auto.md."""
    parts = [f"{name}: {base}, the {100 * share:g} % of the adapted weights the fine-tune moved most at {higher}"
             for name, (base, higher, share) in MIXES.items()]
    return "; ".join(parts) + " (moved: the importance-weighted energy of the LoRA delta per weight)"
