#!/usr/bin/env python
"""Evaluation generation speed: fasttune's eval loops vs answering one example at a time, same run.

    python bench/eval.py [--examples 12] [--max-new-tokens 32]

On a Qwen2.5-0.5B-shaped model (random weights, real tokenizer; cached), greedy answers to the
clinical QA eval prompts (they share the recipe's system prompt):
  GGUF (q8_0, llama-cpp-python): fasttune's loop keeps one model loaded and lets llama-cpp-python
    reuse the KV cache of the prompt prefix the examples share; one-by-one resets the cache first.
  HF (transformers, float32 on CPU): fasttune generates in left-padded batches of 8; one-by-one is
    batch size 1.
Each mode runs twice, interleaved, and keeps its best time. Prints seconds per example and per
generated token, with the ratio to one-by-one (goal: <= 1.0), and appends the table to
bench/RESULTS.md. Run it on an otherwise idle machine.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import results  # bench/results.py: this script's folder is on sys.path

import fasttune.model  # noqa: F401  (unsloth first, as in every entry point)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttune import convert, data, infer
    from fasttune.evaluate import answer_gguf, answer_hf
    from fasttune.tiny import QWEN2_5_0_5B_CONFIG, build_model, cache_dir

    from fasttune.config import read_task

    repo = Path(__file__).resolve().parents[1]
    d = read_task(repo / "recipes" / "clinical_qa.yaml")
    examples = data.load(repo / "recipes" / "data" / "clinical_qa_eval.jsonl",
                         data.Templates(d["user_template"], d["assistant_template"], d["system_prompt"]),
                         fmt="fields").examples
    prompts = [ex.messages[:-1] for ex in (examples * 4)[: args.examples]]

    model_dir = build_model(cache_dir() / "qwen2.5-0.5b-shaped", QWEN2_5_0_5B_CONFIG)
    path = convert.convert(model_dir, Path(tempfile.mkdtemp(prefix="fasttune-bench-eval-")) / "m-q8_0.gguf", "q8_0")
    n = len(prompts)

    def one_by_one_gguf():
        answers = []
        with infer.load(path) as llm:
            for p in prompts:
                llm.reset()  # no prefix reuse: each example from an empty cache
                r = infer.chat(llm, p, max_tokens=args.max_new_tokens)
                answers.append(r["usage"]["completion_tokens"])
        return answers

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    # Each mode twice, interleaved, best time kept: the first pass also warms the page cache.
    rows = []
    runs = {"ours": [], "single": []}
    for _ in range(2):
        runs["ours"].append(timed(lambda: [a.tokens for a in answer_gguf(path, prompts, args.max_new_tokens)]))
        runs["single"].append(timed(one_by_one_gguf))
    (t_ours, ours), (t_single, single) = min(runs["ours"]), min(runs["single"])
    rows.append(("GGUF q8_0, llama-cpp-python", t_ours, sum(ours), t_single, sum(single)))

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runs = {"ours": [], "single": []}
    for _ in range(2):
        runs["ours"].append(timed(lambda: [a.tokens for a in answer_hf(model, tokenizer, prompts, args.max_new_tokens,
                                                                        batch_size=8)]))
        runs["single"].append(timed(lambda: [a.tokens for a in answer_hf(model, tokenizer, prompts,
                                                                          args.max_new_tokens, batch_size=1)]))
    (t_ours, ours), (t_single, single) = min(runs["ours"]), min(runs["single"])
    rows.append(("HF float32, transformers generate (batches of 8)", t_ours, sum(ours), t_single, sum(single)))

    lines = [f"| {n} examples, <= {args.max_new_tokens} new tokens, greedy | fasttune s/example | one-by-one "
             "s/example | fasttune ms/token | one-by-one ms/token | per-example ratio |", "|---|---|---|---|---|---|"]
    for name, t_a, tok_a, t_b, tok_b in rows:
        lines.append(f"| {name} | {t_a / n:.2f} | {t_b / n:.2f} | {1000 * t_a / max(tok_a, 1):.0f} | "
                     f"{1000 * t_b / max(tok_b, 1):.0f} | {t_a / t_b:.2f} |")
    table = "\n".join(lines)
    print(table)
    results.append("bench/eval.py", f"python bench/eval.py --examples {n} --max-new-tokens {args.max_new_tokens}",
                   table)


if __name__ == "__main__":
    main()
