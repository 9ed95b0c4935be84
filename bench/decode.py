#!/usr/bin/env python
"""Decode speed: the q4_k_m GGUF through llama-cpp-python vs transformers.generate, and both against
the memory-bandwidth bound, in one run.

    python bench/decode.py [--tokens 64]

On a Qwen2.5-0.5B-shaped model (random weights, real tokenizer; cached): greedy decoding of
--tokens tokens after a short chat prompt, timed after the first token (prefill excluded), for
the q4_k_m and bf16 GGUF files (llama-cpp-python, all cores) and the HF checkpoint
(transformers.generate, float32 and bfloat16 on CPU). Decoding one token reads every weight once,
so tokens/s cannot exceed copy bandwidth / bytes of weights; the bandwidth is measured here with a
large numpy copy. Prints the table and appends it to bench/RESULTS.md.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import results  # bench/results.py: this script's folder is on sys.path


def copy_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Best of `repeats` copies of an mb-sized buffer; a copy reads and writes each byte (2x traffic)."""
    src = np.ones(mb * 2**20, dtype=np.uint8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gguf_decode_tps(path: Path, prompt_ids: list[int], n: int) -> float:
    """Tokens/s of greedy decoding after the first token (llama-cpp-python keeps going past EOS here)."""
    from fasttune import infer

    with infer.load(path, n_ctx=512) as llm:
        stamps = []
        for _ in llm.generate(prompt_ids, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n + 1:
                break
    return n / (stamps[-1] - stamps[0])


def hf_decode_tps(model, prompt_ids: list[int], n: int) -> float:
    """Tokens/s of transformers.generate: (n+1 new tokens) minus (1 new token) removes the prefill."""
    import torch

    ids = torch.tensor([prompt_ids])
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        one = min(_timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)) for _ in range(2))
        many = _timed(lambda: model.generate(ids, max_new_tokens=n + 1, min_new_tokens=n + 1, **kwargs))
    return n / (many - one)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttune import convert, cpu_threads, quantize
    from fasttune.tiny import QWEN2_5_0_5B_CONFIG, build_model, cache_dir

    model_dir = build_model(cache_dir() / "qwen2.5-0.5b-shaped", QWEN2_5_0_5B_CONFIG)
    out = Path(tempfile.mkdtemp(prefix="fasttune-bench-decode-"))
    bf16 = convert.convert(model_dir, out / "m-bf16.gguf", "bf16")
    q4 = quantize.quantize(bf16, out / "m-q4_k_m.gguf", "q4_k_m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Summarize: fever and cough for 3 days."}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    bandwidth = copy_bandwidth_gbs()

    rows = []  # (name, bytes of weights read per token, tokens/s)
    for path in (q4, bf16):
        rows.append((f"GGUF {path.stem.split('-')[-1]}, llama-cpp-python", path.stat().st_size,
                     gguf_decode_tps(path, prompt_ids, args.tokens)))
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append((f"HF {str(dtype).split('.')[-1]}, transformers.generate", n_bytes,
                     hf_decode_tps(model, prompt_ids, args.tokens)))
        del model

    q4_tps = rows[0][2]
    lines = [f"| decode, {args.tokens} tokens, greedy, {cpu_threads()} threads (copy bandwidth {bandwidth:.1f} GB/s) "
             "| weights read per token | tokens/s | bandwidth bound | share of bound | q4_k_m speed-up |",
             "|---|---|---|---|---|---|"]
    for name, n_bytes, tps in rows:
        bound = bandwidth * 1e9 / n_bytes
        lines.append(f"| {name} | {n_bytes / 1e6:.0f} MB | {tps:.1f} | {bound:.1f} | {tps / bound:.0%} | "
                     f"{q4_tps / tps:.2f}x |")
    table = "\n".join(lines)
    print(table)
    results.append("bench/decode.py", f"python bench/decode.py --tokens {args.tokens}", table)


if __name__ == "__main__":
    main()
