#!/usr/bin/env python
"""Data preparation speed: fasttune vs TRL's own SFTTrainer dataset preparation, same run, same data.

    python bench/data.py [--records 100000]

fasttune's side reads N synthetic records from JSONL files in four formats (messages, sharegpt,
alpaca, prompt_completion), validates and converts them, tokenizes with the assistant mask and
applies the length policy. TRL's side gets the same conversations already as `messages` (the
reading and converting are not timed for it) and builds its tokenized, masked training set
(assistant_only_loss=True) inside SFTTrainer. TRL's fixed start-up cost is measured on a
one-record dataset and subtracted. Prints records/s and the ratio; appends to bench/RESULTS.md.
"""

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import results  # bench/results.py: this script's folder is on sys.path

WORDS = ("patient presents with acute chest pain dyspnoea fever cough history of hypertension diabetes "
         "examination shows tenderness blood pressure heart rate saturation creatinine sodium potassium "
         "diagnosis management treatment follow up dose daily oral intravenous risk of the and a in on").split()


def sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def synthetic(n, seed=0):
    """n conversations with realistic lengths: 1-3 turns, prompts 20-250 words, answers 5-120."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = [{"role": "system", "content": sentence(rng, 5, 15)}]
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            turns += [{"role": "user", "content": sentence(rng, 20, 250)},
                      {"role": "assistant", "content": sentence(rng, 5, 120)}]
        out.append(turns)
    return out


def as_format(messages, fmt):
    """One conversation in one of the four record shapes (single-turn ones for alpaca/prompt_completion)."""
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "alpaca":
        return {"system": messages[0]["content"], "instruction": messages[1]["content"], "input": "",
                "output": messages[2]["content"]}
    return {"prompt": messages[:2], "completion": [messages[2]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    from fasttune import chat, data
    from fasttune.tiny import tiny_model_dir

    model_dir = tiny_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    formats = ("messages", "sharegpt", "alpaca", "prompt_completion")
    conversations = synthetic(args.records)
    # alpaca and prompt_completion are single-turn: give those files single-turn conversations
    parts = {fmt: [] for fmt in formats}
    for i, conv in enumerate(conversations):
        fmt = formats[i % 4]
        parts[fmt].append(conv[:3] if fmt in ("alpaca", "prompt_completion") else conv)
    tmp = Path(tempfile.mkdtemp(prefix="fasttune-bench-"))
    for fmt, convs in parts.items():
        with open(tmp / f"{fmt}.jsonl", "w") as f:
            for conv in convs:
                f.write(json.dumps(as_format(conv, fmt)) + "\n")
    same_conversations = [c for fmt in formats for c in parts[fmt]]

    # fasttune: read + validate + convert + tokenize + mask + length policy
    t0 = time.perf_counter()
    examples = [ex for fmt in formats for ex in data.load(tmp / f"{fmt}.jsonl").examples]
    prepared = chat.prepare(examples, tokenizer, args.max_length)
    ours = time.perf_counter() - t0
    assert len(prepared.rows) == args.records, (len(prepared.rows), prepared.stats)

    # TRL: SFTTrainer's dataset preparation on the same conversations (as messages), single process
    # (its default) and with one process per core.
    trl_times = {nproc: trl_prepare_seconds(model_dir, tokenizer, same_conversations, args.max_length, nproc)
                 for nproc in (None, os.cpu_count())}

    rows = [("fasttune (4 files, 4 formats)", ours)] + [
        (f"TRL SFTTrainer, dataset_num_proc={n}", t) for n, t in trl_times.items()]
    lines = [f"| {name} | {t:.1f} s | {args.records / t:,.0f} records/s | {trl_times[None] / t:.2f} |"
             for name, t in rows]
    header = ("| data preparation, {n:,} records | time | throughput | speed vs TRL default |\n"
              "|---|---|---|---|").format(n=args.records)
    table = "\n".join([header, *lines])
    print(table)
    results.append("bench/data.py", f"python bench/data.py --records {args.records}", table)


def trl_prepare_seconds(model_dir, tokenizer, conversations, max_length, nproc):
    """Seconds SFTTrainer spends preparing `conversations`, its fixed start-up cost subtracted."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir)

    def build(convs):
        args = SFTConfig(output_dir=tempfile.mkdtemp(), assistant_only_loss=True, max_length=max_length,
                         dataset_num_proc=nproc, report_to="none", use_cpu=True, bf16=False)
        t0 = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"messages": c} for c in convs]))
        seconds = time.perf_counter() - t0
        assert len(trainer.train_dataset) == len(convs)
        return seconds

    return build(conversations) - build(conversations[:1])


if __name__ == "__main__":
    main()
